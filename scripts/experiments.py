"""The paper's experiments (Patel et al. 2023, §4, Figures 3-4, Table 1) on the embedded synthetic data.

For each training-set contamination ratio: generate the training set (scripts.synthetic, that anomalous fraction),
run the bundle's ILTM training, and evaluate on one shared test set (its random streams are keyed by the test
split alone, so it is the same set whatever the training fraction):

- ``vqvae_dropout``: the ablation without resampling (original latent, decoder dropout only). It shows what the
  VQ-VAE's reconstruction error finds on its own; ILTM can only improve on what the Transformer's healing adds.
- ``transformer``: ILTM iteration 0, the plain VQ-VAE + Transformer baseline (``iltm/iter_00/model.pt``).
- ``iltm``: the final ILTM iteration (``model.pt``); with ``all_iterations`` every iteration (Figure 3).
- ``iltm_fixed`` (with ``fixed_threshold``): ILTM with a fixed resampling threshold, sharing the VQ-VAE and iteration 0.

Writes under ``exp_dir``: ``results.csv`` (one row per evaluated model), ``figure4.png`` (metrics vs contamination),
``figure3.png`` (metrics and token-mask precision/recall vs ILTM iteration), ``table1.md``. Everything is resumable:
a finished training (``model.pt``) or evaluation (``metrics.json``) is skipped, an interrupted training resumes.

    python -m scripts.experiments run                                   # 2D demo preset, ratios 0-0.8
    python -m scripts.experiments run --kind 3d                         # 3D PET-like demo preset, ratios 0-1
    python -m scripts.experiments run --ratios "[0.0,0.8]" --n_test 20 --fixed_threshold True --all_iterations True
    python -m scripts.experiments run --overrides "{'vqvae#epochs': 10, 'transformer#epochs': 5}"
    python -m scripts.experiments report --exp_dir runs/experiments     # tables and figures only
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from scripts.contamination import ratio_tag

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {"2d": "configs/demo.yaml", "3d": "configs/demo3d.yaml"}
RATIOS = {"2d": (0.0, 0.2, 0.4, 0.6, 0.8), "3d": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)}
METRICS = ("aupro", "best_dice", "pixel_auroc", "image_auroc", "dice_at_density_threshold")
LABELS = {
    "vqvae_dropout": "VQ-VAE, dropout only (no resampling)",
    "transformer": "VQ-VAE + Transformer (ILTM iteration 0)",
    "iltm": "ILTM (final iteration)",
    "iltm_fixed": "ILTM, fixed threshold (final iteration)",
}
# what determines results: a rerun with other values would mix incompatible outputs in one folder
RECORDED = ("preset", "n_train", "n_test", "overrides", "eval_overrides")


def run(
    exp_dir: str = "runs/experiments",
    kind: str = "2d",
    ratios: Sequence[float] | None = None,
    preset: str | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    fixed_threshold: bool = False,
    ablation: bool = True,
    all_iterations: bool = False,
    overrides: dict[str, Any] | None = None,
    eval_overrides: dict[str, Any] | None = None,
    in_process: bool = False,
) -> list[dict]:
    """Train and evaluate every ratio, then write the report; returns the result rows.

    Args:
        exp_dir: everything goes here (data/, runs/, eval/, logs/, results.csv, figures, table1.md).
        kind: "2d" (inspection textures) or "3d" (PET-like phantoms): picks the default preset and ratios.
        ratios: training-set anomalous fractions (default 0-0.8 in 2D, 0-1 in 3D).
        preset: config layered on train/inference (default configs/demo.yaml or configs/demo3d.yaml).
        n_train, n_test: override the preset's synthetic set sizes (a smaller test set is faster to evaluate).
        fixed_threshold: also train ILTM with a fixed resampling threshold.
        ablation: also evaluate the no-resampling ablation (``network_def#resample: false``).
        all_iterations: evaluate every ILTM iteration, not only iteration 0 and the final one.
        overrides: config overrides for training and evaluation, e.g. ``{'vqvae#epochs': 5}``; keys
            ``synthetic#...`` change the generated data.
        eval_overrides: config overrides for evaluation only.
        in_process: run the bundle in this process (faster start, for tests) instead of a subprocess per step.
    """
    preset = preset or PRESETS[kind]
    ratios = [float(r) for r in (RATIOS[kind] if ratios is None else _as_list(ratios))]
    overrides, eval_overrides = dict(overrides or {}), dict(eval_overrides or {})
    exp_dir = os.path.abspath(exp_dir)
    _record(
        exp_dir, dict(preset=preset, n_train=n_train, n_test=n_test, overrides=overrides, eval_overrides=eval_overrides)
    )
    synthetic = synthetic_params(preset, overrides, n_train, n_test)
    overrides = {k: v for k, v in overrides.items() if not k.startswith("synthetic#")}
    test_datalist = shared_test_set(os.path.join(exp_dir, "data", "test"), synthetic)
    for ratio in ratios:
        tag = ratio_tag(ratio)
        base = os.path.join(exp_dir, "runs", tag)
        data = dict(synthetic, anomalous_fraction=ratio, n_test=0)
        train(base, os.path.join(exp_dir, "data", tag), data, preset, overrides, exp_dir, in_process)
        runs = {"decreasing": base}
        if fixed_threshold:
            fixed = base + "_fixed"
            share_first_stage(base, fixed)
            train(fixed, os.path.join(exp_dir, "data", tag), data, preset, {**overrides, "fixed_threshold": True},
                  exp_dir, in_process)  # fmt: skip
            runs["fixed"] = fixed
        for name, checkpoint, extra in evaluations(runs, ablation, all_iterations):
            out = os.path.join(exp_dir, "eval", tag, name)
            evaluate(
                checkpoint, out, test_datalist, preset, {**overrides, **eval_overrides, **extra}, exp_dir, in_process
            )
    return report(exp_dir)


# ---------------------------------------------------------------------------------------------- steps


def synthetic_params(preset: str, overrides: dict, n_train: int | None, n_test: int | None) -> dict:
    """The preset's ``synthetic`` section (train.yaml's when the preset has none) with the experiment's changes."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(BUNDLE_ROOT, "configs", "train.yaml"), _path(preset)])
    params = dict(parser.get("synthetic") or {})
    params.update({k.split("#", 1)[1]: v for k, v in overrides.items() if k.startswith("synthetic#")})
    params.update({k: v for k, v in (("n_train", n_train), ("n_test", n_test)) if v is not None})
    params["preview"] = False
    return params


def shared_test_set(folder: str, synthetic: dict) -> str:
    """One test set for every ratio: the preset's test split alone (no training images), generated once."""
    from scripts.synthetic import ensure_dataset

    params = {k: v for k, v in synthetic.items() if k != "kind"}
    return ensure_dataset(folder, synthetic.get("kind", "2d"), **{**params, "n_train": 0, "n_val": 0})


def train(
    output_dir: str, dataset_dir: str, synthetic: dict, preset: str, overrides: dict, exp_dir: str, in_process: bool
) -> None:
    """The bundle's training (VQ-VAE + ILTM) for one ratio; skipped when its final model.pt exists."""
    if os.path.isfile(os.path.join(output_dir, "model.pt")):
        return
    args = {
        "dataset_dir": dataset_dir,
        "output_dir": output_dir,
        "synthetic": synthetic,
        "iltm#export": "",
        **overrides,
    }
    bundle("training", ["configs/train.yaml", preset], args, _log(exp_dir, output_dir), in_process)


def share_first_stage(source: str, target: str) -> None:
    """Seed a variant's run with the source run's VQ-VAE and iteration 0, which do not depend on the ILTM threshold.

    The training resumes from them (state.json steps ``vqvae`` and ``transformer_00``), so both variants start from
    the same iteration 0 and the comparison isolates the threshold schedule.
    """
    if os.path.exists(os.path.join(target, "state.json")):
        return
    with open(os.path.join(source, "state.json")) as f:
        steps = json.load(f)
    for sub in ("vqvae", "tokens", os.path.join("iltm", "iter_00")):
        shutil.copytree(os.path.join(source, sub), os.path.join(target, sub), dirs_exist_ok=True)
    shutil.copy2(
        os.path.join(source, "iltm", "transformer_init.pt"), os.path.join(target, "iltm", "transformer_init.pt")
    )
    with open(os.path.join(target, "state.json"), "w") as f:
        json.dump({k: v for k, v in steps.items() if k in ("vqvae", "transformer_00")}, f, indent=2)


def evaluations(runs: dict[str, str], ablation: bool, all_iterations: bool) -> list[tuple[str, str, dict]]:
    """(name, checkpoint, config overrides) of every model to evaluate; names are eval/<ratio>/ folder names."""
    base = runs["decreasing"]
    out = [("vqvae_dropout", _iteration_model(base, 0), {"network_def#resample": False})] if ablation else []
    for variant, folder in runs.items():
        final = final_iteration(folder)
        chosen = range(final + 1) if all_iterations else sorted({0, final})
        prefix = "" if variant == "decreasing" else f"{variant}_"
        out += [(f"{prefix}iter_{k:02d}", _iteration_model(folder, k), {}) for k in chosen if prefix == "" or k > 0]
    return out


def evaluate(
    checkpoint: str, output_dir: str, datalist: str, preset: str, overrides: dict, exp_dir: str, in_process: bool
) -> None:
    """The bundle's evaluation of one checkpoint on the shared test set; skipped when its metrics.json exists."""
    if os.path.isfile(os.path.join(output_dir, "metrics.json")):
        return
    args = {
        "dataset_dir": os.path.dirname(datalist), "datalist": datalist, "checkpoint": checkpoint,
        "output_dir": output_dir, "save_maps": False, "save_overlays": False, **overrides,
    }  # fmt: skip
    configs = ["configs/inference.yaml", preset, "configs/evaluate.yaml"]
    bundle("evaluating", configs, args, _log(exp_dir, output_dir), in_process)


def bundle(run_id: str, configs: Sequence[str], overrides: dict, log: str, in_process: bool) -> None:
    """``python -m monai.bundle run <run_id>`` with config overrides, printed so that it can be rerun by hand."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", repr(list(configs))]
    cmd += [f"--{k}={v!r}" for k, v in overrides.items()]  # fire reads Python literals
    print(f"[experiments] python {' '.join(_quote(c) for c in cmd[1:])}", flush=True)
    start = time.time()
    os.makedirs(os.path.dirname(log), exist_ok=True)
    if in_process:
        from monai.bundle import run as bundle_run

        bundle_run(run_id, config_file=[_path(c) for c in configs], **overrides)
    else:
        with open(log, "w") as f:
            code = subprocess.call(cmd, cwd=BUNDLE_ROOT, stdout=f, stderr=subprocess.STDOUT)
        if code:
            with open(log) as f:
                tail = "".join(f.readlines()[-30:])
            raise RuntimeError(f"{run_id} failed (exit {code}); last lines of {log}:\n{tail}")
    print(f"[experiments] {run_id} done in {time.time() - start:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------- results


def final_iteration(run_dir: str) -> int:
    """The iteration whose Transformer is the run's final model (from iltm/summary.csv, else the last one saved)."""
    for row in _summary(run_dir):
        if row.get("trained") == "final":
            return int(row["iteration"])
    done = [k for k in range(100) if os.path.isfile(_iteration_model(run_dir, k))]
    if not done:
        raise FileNotFoundError(f"{run_dir}: no iltm/iter_KK/model.pt; has the training finished?")
    return max(done)


def collect(exp_dir: str) -> list[dict]:
    """One row per evaluated model: its ratio, method, ILTM iteration, metrics and the masks it was trained with."""
    rows = []
    eval_root = os.path.join(exp_dir, "eval")
    for tag in sorted(os.listdir(eval_root)) if os.path.isdir(eval_root) else []:
        ratio = float(tag[1:])
        runs = {
            "decreasing": os.path.join(exp_dir, "runs", tag),
            "fixed": os.path.join(exp_dir, "runs", tag + "_fixed"),
        }
        for name in sorted(os.listdir(os.path.join(eval_root, tag))):
            path = os.path.join(eval_root, tag, name, "metrics.json")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                result = json.load(f)
            variant = "fixed" if name.startswith("fixed_") else "decreasing"
            iteration = 0 if name == "vqvae_dropout" else int(name.rsplit("_", 1)[1])
            final = iteration == final_iteration(runs[variant]) if name != "vqvae_dropout" else False
            masks = {int(r["iteration"]): r for r in _summary(runs[variant])}.get(iteration, {})
            if name == "vqvae_dropout":  # no Transformer, no masks
                masks = {}
            method = "vqvae_dropout" if name == "vqvae_dropout" else ("transformer" if iteration == 0 else "iltm")
            if method == "iltm" and variant == "fixed":
                method = "iltm_fixed"
            rows.append({
                "ratio": ratio, "method": method, "variant": variant, "iteration": iteration, "final": final,
                **{m: result.get(m) for m in METRICS},
                "masked_pct": _float(masks.get("masked_pct")), "token_precision": _float(masks.get("precision")),
                "token_recall": _float(masks.get("recall")), "n_images": result.get("n_images"),
                "checkpoint": os.path.relpath(result.get("checkpoint", ""), exp_dir),
            })  # fmt: skip
    order = list(LABELS)
    return sorted(rows, key=lambda r: (r["ratio"], order.index(r["method"]), r["iteration"]))


def report(exp_dir: str = "runs/experiments") -> list[dict]:
    """results.csv, figure4.png, figure3.png and table1.md from whatever evaluations exist under exp_dir."""
    exp_dir = os.path.abspath(exp_dir)
    rows = collect(exp_dir)
    if not rows:
        raise FileNotFoundError(f"{exp_dir}: no evaluations yet (eval/<ratio>/<model>/metrics.json)")
    with open(os.path.join(exp_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_contamination(rows, os.path.join(exp_dir, "figure4.png"))
    plot_iterations(rows, exp_dir, os.path.join(exp_dir, "figure3.png"))
    table = markdown_table(rows)
    with open(os.path.join(exp_dir, "table1.md"), "w") as f:
        f.write(table + "\n")
    print(table, flush=True)
    return rows


def headline(rows: Sequence[dict]) -> list[dict]:
    """The rows of Figure 4 and Table 1: the ablation, iteration 0 and each variant's final iteration."""
    return [r for r in rows if r["method"] in ("vqvae_dropout", "transformer") or r["final"]]


def markdown_table(rows: Sequence[dict]) -> str:
    """Table 1 style: methods x contamination ratios, cells "AUPRO / best Dice" and "pixel / image AUROC" in %."""
    rows = headline(rows)
    ratios = sorted({r["ratio"] for r in rows})
    methods = [m for m in LABELS if any(r["method"] == m for r in rows)]
    by = {(r["method"], r["ratio"]): r for r in rows}
    lines = []
    for title, (a, b) in (("AUPRO / best Dice (%)", ("aupro", "best_dice")),
                          ("pixel AUROC / image AUROC (%)", ("pixel_auroc", "image_auroc"))):  # fmt: skip
        lines += [f"**{title}** by training-set contamination", ""]
        lines += ["| method | " + " | ".join(f"{r:.0%}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
        for m in methods:
            cells = [f"{_pct(by.get((m, r), {}).get(a))} / {_pct(by.get((m, r), {}).get(b))}" for r in ratios]
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def plot_contamination(rows: Sequence[dict], path: str) -> None:
    """Figure 4: each metric against the training-set contamination, one line per method."""
    rows = headline(rows)
    fig, axes = _figure(1, 4, (14, 3.4))
    for ax, metric in zip(axes[0], ("aupro", "best_dice", "pixel_auroc", "image_auroc")):
        for method in LABELS:
            pts = sorted((r["ratio"], r[metric]) for r in rows if r["method"] == method and r[metric] is not None)
            if pts:
                ax.plot(*zip(*pts), "o-", label=LABELS[method])
        ax.set_xlabel("anomalous training images")
        ax.set_xticks(sorted({r["ratio"] for r in rows}))
        ax.set_ylim(0, 1.02)
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_iterations(rows: Sequence[dict], exp_dir: str, path: str) -> None:
    """Figure 3: AUPRO and best Dice of each evaluated iteration, and the token masks' precision / recall against
    the true anomalous tokens (every iteration, from iltm/summary.csv), one line per ratio and threshold variant."""
    fig, axes = _figure(1, 4, (14, 3.4))
    models = [r for r in rows if r["method"] != "vqvae_dropout"]
    for ratio in sorted({r["ratio"] for r in models}):
        for variant, style in (("decreasing", "o-"), ("fixed", "s--")):
            pts = sorted(
                (r["iteration"], r)
                for r in models
                if r["ratio"] == ratio and (r["variant"] == variant or r["iteration"] == 0)
            )
            name = f"{ratio:.0%}" + (" fixed t" if variant == "fixed" else "")
            if variant == "fixed" and not any(r["variant"] == "fixed" for _, r in pts):
                continue
            for ax, metric in zip(axes[0][:2], ("aupro", "best_dice")):
                xy = [(k, r[metric]) for k, r in pts if r[metric] is not None]
                if xy:
                    ax.plot(*zip(*xy), style, label=name)
            run_dir = os.path.join(exp_dir, "runs", ratio_tag(ratio) + ("_fixed" if variant == "fixed" else ""))
            masks = [r for r in _summary(run_dir) if int(r["iteration"]) > 0]
            for ax, key in zip(axes[0][2:], ("precision", "recall")):
                xy = [(int(r["iteration"]), _float(r[key])) for r in masks if not math.isnan(_float(r[key]))]
                if xy:
                    ax.plot(*zip(*xy), style, label=name)
    titles = ("test AUPRO", "test best Dice", "token-mask precision", "token-mask recall")
    for ax, title in zip(axes[0], titles):
        ax.set_xlabel("ILTM iteration")
        ax.set_xticks(range(max((r["iteration"] for r in models), default=0) + 1))
        ax.set_ylim(0, 1.02)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, title="contamination", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------- helpers


def _iteration_model(run_dir: str, k: int) -> str:
    return os.path.join(run_dir, "iltm", f"iter_{k:02d}", "model.pt")


def _summary(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "iltm", "summary.csv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _record(exp_dir: str, params: dict) -> None:
    """experiment.json: a rerun into the same folder must use the same settings, or results would mix."""
    os.makedirs(exp_dir, exist_ok=True)
    path = os.path.join(exp_dir, "experiment.json")
    params = json.loads(json.dumps(params))
    if os.path.isfile(path):
        with open(path) as f:
            recorded = json.load(f)
        changed = [
            f"{k}={params.get(k)!r} (recorded {recorded.get(k)!r})"
            for k in RECORDED
            if recorded.get(k) != params.get(k)
        ]
        if changed:
            raise ValueError(
                f"{exp_dir} holds an experiment with other settings: {', '.join(changed)}; use another exp_dir"
            )
        return
    with open(path, "w") as f:
        json.dump(params, f, indent=2)


def _log(exp_dir: str, output_dir: str) -> str:
    return os.path.join(exp_dir, "logs", os.path.relpath(output_dir, exp_dir).replace(os.sep, "__") + ".log")


def _path(config: str) -> str:
    return config if os.path.isabs(config) else os.path.join(BUNDLE_ROOT, config)


def _as_list(value: Any) -> list:
    if isinstance(value, str):
        return [v for v in value.strip("[]() ").split(",") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _quote(arg: str) -> str:
    return arg if all(c.isalnum() or c in "-_./=#:" for c in arg) else '"' + arg.replace('"', '\\"') + '"'


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _pct(value: Any) -> str:
    return "-" if value is None or math.isnan(_float(value)) else f"{100 * float(value):.1f}"


def _figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: leaves the process's backend alone

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


if __name__ == "__main__":
    import fire

    fire.Fire({"run": run, "report": report})
