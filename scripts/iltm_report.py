"""What an ILTM run shows its user: a per-iteration table, TensorBoard scalars, a plot and a panel of masks.

Everything is rebuilt from `state.json` and the mask files on disk, so a resumed run reports the same as an
uninterrupted one.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

from scripts import iltm_checks
from scripts.plots import figure
from scripts.steps import RunState, read_record
from scripts.tokens import load_token_masks

COLUMNS = (
    "iteration",
    "threshold",
    "masked_tokens",
    "masked_pct",
    "precision",
    "recall",
    "flag_precision",
    "flag_recall",
    "mask_s",
    "train_s",
    "epoch",
    "val_loglik",
    "trained",
)


def _measured(record: dict, key: str) -> float:
    """NaN where nothing was measured: state.json holds null there (NaN before 0.6.4), or no entry."""
    value = record.get(key)
    return float("nan") if value is None else float(value)


def iteration_rows(state: RunState, final: int) -> list[dict]:
    """One row per iteration: the masks it trained with, their quality, and the Transformer it produced."""
    rows, k = [], 0
    while k == 0 or f"masks_{k:02d}" in state.steps:
        masks = state.steps.get(f"masks_{k:02d}", {})
        train = state.steps.get(f"transformer_{k:02d}", {})
        total = masks.get("total_tokens")
        rows.append(
            {
                "iteration": k,
                "threshold": _measured(masks, "threshold"),
                "masked_tokens": masks.get("masked_tokens", 0),
                "masked_pct": 100.0 * masks["masked_tokens"] / total if total else 0.0,
                "precision": _measured(masks, "precision"),
                "recall": _measured(masks, "recall"),
                "flag_precision": _measured(masks, "flag_precision"),
                "flag_recall": _measured(masks, "flag_recall"),
                "mask_s": masks.get("wall_time_s", 0.0),
                "train_s": _measured(train, "wall_time_s"),
                "epoch": train.get("best_epoch", "-"),  # the Transformer's kept (best validated) epoch
                "val_loglik": _measured(train, "val_loglik"),
                "trained": _trained(train, k == final),
            }
        )
        k += 1
    return rows


def _trained(record: dict, final: bool) -> str:
    """How the iteration's Transformer came about: trained, or reused where its masks equal the previous ones."""
    if not record:
        return "no (converged)"
    status = "final" if final else "yes"
    same = record.get("same_masks_as")
    return status if same is None else f"{status} (masks of iteration {same}: its model)"


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table; NaN (no ground truth, not trained) shows as '-'."""

    def cell(value) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else (f"{value:.2e}" if 0 < abs(value) < 0.01 else f"{value:.3f}")
        return str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def _csv_cell(value: object) -> object:
    """An empty cell where nothing was measured (spreadsheets and pandas read it as missing; `nan` is a string to
    some readers)."""
    return "" if value == "-" or (isinstance(value, float) and math.isnan(value)) else value


def _resumed(output_dir: str) -> str:
    """The settings a run was resumed with (`--resume True`): its later steps used them, the record keeps the first."""
    path = os.path.join(output_dir, "run.json")
    resumed = read_record(path, "what the run was started with").get("resumed", []) if os.path.isfile(path) else []
    return "".join(
        f"\n\n**Resumed with other settings** (--resume True, {r['at']}) after the steps "
        f"{', '.join(r['after_steps']) or 'none'}: the steps after them used {'; '.join(r['differences'])}. "
        "Iteration 0 and the final iteration may differ in more than their masks."
        for r in resumed
    )


def write_report(
    output_dir: str,
    state: RunState,
    final: int,
    files: Sequence[dict],
    transform: Callable,
    truth: torch.Tensor | None,
    grid: Sequence[int],
    checks: dict | None = None,
    panel_images: int = 4,
) -> dict:
    """Writes `iltm/summary.{md,csv}`, TensorBoard scalars, `iltm/progress.png`, `iltm/mask_panel.png`; prints it.

    `checks` (:mod:`scripts.iltm_checks`) adds the section "Can ILTM help here?" with its warnings.
    """
    folder = os.path.join(output_dir, "iltm")
    rows = iteration_rows(state, final)
    table = format_table(rows)
    section = iltm_checks.render(checks) if checks is not None else ""
    table += _resumed(output_dir)
    print(f"\nILTM iterations (final: {final})\n{table}\n\n{section}\n", flush=True)
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write(f"# ILTM iterations (final: {final})\n\n{table}\n" + (f"\n{section}\n" if section else ""))
    with open(os.path.join(folder, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: _csv_cell(row[c]) for c in COLUMNS} for row in rows)
    _log_scalars(state, rows, os.path.join(folder, "tensorboard"))
    _plot_progress(rows, os.path.join(folder, "progress.png"))
    masks = [
        load_token_masks(os.path.join(folder, f"iter_{r['iteration']:02d}", "token_masks.pt"), files, grid)
        for r in rows[1:]
    ]
    _plot_panel(files, transform, truth, masks, os.path.join(folder, "mask_panel.png"), panel_images)
    return {"final_iteration": final, "iterations": rows, "checks": checks,
            "warnings": iltm_checks.warnings(checks) if checks is not None else []}  # fmt: skip


def _log_scalars(state: RunState, rows: Sequence[dict], folder: str) -> None:
    """The table's columns as TensorBoard scalars per iteration, each iteration once (`state.json` step
    ``scalars_KK``: logged up to iteration K): a rerun of the finished run adds no copy, a longer run its new rows."""
    done = [int(step.split("_")[1]) for step in state.steps if step.startswith("scalars_")]
    new = [row for row in rows if row["iteration"] > max(done, default=-1)]
    if not new:
        return
    with SummaryWriter(folder) as board:
        for row in new:
            for name in ("masked_tokens", "masked_pct", "precision", "recall", "flag_precision", "flag_recall",
                         "threshold", "val_loglik"):  # fmt: skip
                if not math.isnan(float(row[name])):
                    board.add_scalar(f"iltm/{name}", float(row[name]), row["iteration"])
    state.complete(f"scalars_{new[-1]['iteration']:02d}")


def _plot_progress(rows: Sequence[dict], path: str) -> None:
    iterations = [r["iteration"] for r in rows]
    fig = figure(figsize=(6, 3.5))
    left = fig.subplots()
    left.plot(iterations, [r["masked_pct"] for r in rows], "o-", color="tab:red", label="masked tokens")
    left.set_xlabel("ILTM iteration")
    left.set_ylabel("masked tokens (% of all)")
    left.set_xticks(iterations)
    if any(not math.isnan(r["precision"]) for r in rows):
        right = left.twinx()
        right.plot(iterations, [r["precision"] for r in rows], "s--", color="tab:blue", label="precision")
        right.plot(iterations, [r["recall"] for r in rows], "^--", color="tab:green", label="recall")
        right.plot(iterations, [r["flag_precision"] for r in rows], "s:", color="tab:purple", label="flag precision")
        right.plot(iterations, [r["flag_recall"] for r in rows], "^:", color="tab:olive", label="flag recall")
        right.set_ylabel("token masks vs ground truth")
        right.set_ylim(0, 1.05)
        right.legend(loc="center right")
    left.legend(loc="upper left")
    left.set_title("ILTM: masked tokens per iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _slice(volume: torch.Tensor, index: int | None) -> torch.Tensor:
    """2D maps pass through; 3D [X, Y, Z] volumes show the coronal slice `index` (mid by default)."""
    if volume.ndim == 2:
        return volume
    return volume[:, volume.shape[1] // 2 if index is None else index, :]


def _plot_panel(files, transform, truth, masks, path: str, n: int) -> None:
    """A few training images (anomalous ones first when ground truth exists) with each iteration's token mask."""
    order = list(range(len(files)))
    if truth is not None:
        order.sort(key=lambda i: -int(truth[i].any()))
    chosen = order[:n]
    cols = 2 + len(masks)
    fig = figure(figsize=(2 * cols, 2 * len(chosen)))
    axes = fig.subplots(len(chosen), cols, squeeze=False)
    for row, i in enumerate(chosen):
        item = transform(files[i])
        image = item["image"][0].float()
        spatial = tuple(image.shape)
        index = None
        if image.ndim == 3 and "label" in item and item["label"].any():
            index = int(item["label"][0].sum(dim=(0, 2)).argmax())
        label = item["label"][0] if "label" in item else None  # unlabelled: an empty panel would read as "normal"
        panels = [("image", None), ("ground truth" if label is not None else "no label", label)]
        for k, mask in enumerate(masks, start=1):
            up = F.interpolate(mask[i][None, None].float(), size=spatial, mode="nearest")[0, 0]
            panels.append((f"masks it. {k}", up))
        for col, (title, overlay) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(_slice(image, index).T, cmap="gray", origin="lower" if image.ndim == 3 else "upper")
            if overlay is not None:
                shown = _slice(overlay, index).T.numpy()
                ax.imshow(
                    shown, cmap="autumn", alpha=0.45 * (shown > 0), origin="lower" if image.ndim == 3 else "upper"
                )
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
