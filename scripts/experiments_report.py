"""Tables and figures of the contamination sweep (:mod:`scripts.experiments`), rebuilt from what is on disk.

Rows come from ``seed_S/eval/<ratio>/<model>/metrics.json`` and each run's ``iltm/summary.csv``; the tables give
mean +- sd over seeds (sd of one seed is shown as "-"), and "ILTM gain" pairs each seed's final iteration with its
own iteration 0, so that seed-to-seed differences in difficulty do not hide the effect.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from matplotlib.ticker import MaxNLocator

from scripts.baselines import METHODS
from scripts.cli import as_list
from scripts.iltm_checks import SIGN_TEST, sign_test
from scripts.plots import figure

METRICS = ("aupro", "best_dice", "pixel_auroc", "image_auroc", "dice_at_density_threshold")
MASK_COLUMNS = ("masked_pct", "precision", "recall", "flag_precision", "flag_recall")
# (method, variant) -> label, in table order; variant "" is the base run
LABELS = {
    **{(name, ""): method.label for name, method in METHODS.items()},
    ("vqvae_dropout", ""): "VQ-VAE, dropout only (no resampling)",
    ("transformer", ""): "VQ-VAE + Transformer (ILTM iteration 0)",
    ("iltm", ""): "ILTM (final iteration)",
    ("iltm", "fixed"): "ILTM, fixed threshold (final iteration)",
    ("transformer", "unrestricted"): "VQ-VAE + Transformer, map not restricted to flags",
    ("iltm", "unrestricted"): "ILTM, map and masks not restricted to flags (final iteration)",
    ("transformer", "restricted"): "VQ-VAE + Transformer, map restricted to flags",
    ("iltm", "restricted"): "ILTM, map restricted to flags (final iteration)",
    ("transformer", "oracle"): "Oracle: Transformer trained with the labelled anomalous tokens masked",
    ("transformer", "hits"): "Transformer trained with ILTM's first masks that are labelled anomalous (no false mask)",
    ("transformer", "hits_false"): "Transformer trained with all labelled tokens and ILTM's first false masks",
}
TITLES = {"aupro": "AUPRO", "best_dice": "best Dice", "pixel_auroc": "pixel AUROC", "image_auroc": "image AUROC"}


def final_iteration(run_dir: str) -> int:
    """The iteration whose Transformer is the run's final model (from iltm/summary.csv, else the last one saved)."""
    for row in _summary(run_dir):
        if row.get("trained") == "final":
            return int(row["iteration"])
    done = [k for k in range(100) if os.path.isfile(os.path.join(run_dir, "iltm", f"iter_{k:02d}", "model.pt"))]
    if not done:
        raise FileNotFoundError(f"{run_dir}: no iltm/iter_KK/model.pt; has the training finished?")
    return max(done)


def collect(exp_dir: str, seeds: set[int] | None = None) -> list[dict]:
    """One row per evaluated model: seed, ratio, method, variant, iteration, metrics and its training masks' quality.

    `seeds`: only these. An evaluation whose training folder is gone is left out, with a line that names it.
    """
    rows = []
    for seed_dir in sorted(d for d in os.listdir(exp_dir) if d.startswith("seed_")) if os.path.isdir(exp_dir) else []:
        if seeds is not None and int(seed_dir.split("_", 1)[1]) not in seeds:
            continue
        eval_root = os.path.join(exp_dir, seed_dir, "eval")
        for tag in sorted(os.listdir(eval_root)) if os.path.isdir(eval_root) else []:
            for name in sorted(os.listdir(os.path.join(eval_root, tag))):
                path = os.path.join(eval_root, tag, name, "metrics.json")
                if not os.path.isfile(path):
                    continue
                try:
                    rows.append(_row(exp_dir, seed_dir, tag, name, path))
                except FileNotFoundError as e:
                    print(f"{path}: left out, its training run is gone ({e})", file=sys.stderr)
    order = list(LABELS)
    return sorted(rows, key=lambda r: (r["seed"], r["ratio"], order.index((r["method"], r["variant"])), r["iteration"]))


def _row(exp_dir: str, seed_dir: str, tag: str, name: str, path: str) -> dict:
    try:
        with open(path) as f:
            result = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path}: unreadable ({type(e).__name__}: {e}); delete it to evaluate that model again"
        ) from None
    single = name == "vqvae_dropout" or name in METHODS  # one model: no ILTM iterations, no masks
    if single:
        variant, iteration = "", 0
    else:
        variant, _, number = name.rpartition("iter_")
        variant, iteration = variant.rstrip("_"), int(number)
    run_dir = os.path.join(exp_dir, seed_dir, "runs", tag + (f"_{variant}" if variant else ""))
    method = name if single else ("transformer" if iteration == 0 else "iltm")
    masks = {} if single else {int(r["iteration"]): r for r in _summary(run_dir)}.get(iteration, {})
    return {
        "seed": int(seed_dir.split("_", 1)[1]), "ratio": float(tag[1:]), "method": method, "variant": variant,
        "iteration": iteration, "final": name in METHODS or (not single and iteration == final_iteration(run_dir)),
        **{m: result.get(m) for m in METRICS}, **{c: _float(masks.get(c)) for c in MASK_COLUMNS},
        "n_images": result.get("n_images"), "checkpoint": os.path.relpath(result.get("checkpoint", ""), exp_dir),
    }  # fmt: skip


def headline(rows: Sequence[dict]) -> list[dict]:
    """The rows of Figure 4 and Table 1: the ablation, each variant's iteration 0 and final iteration."""
    return [r for r in rows if r["method"] in ("vqvae_dropout", "transformer") or r["final"]]


def summarise(rows: Sequence[dict], metric: str) -> dict[tuple, tuple[float, float, int]]:
    """(method, variant, ratio) -> (mean, sd, n) of a metric over seeds; sd is NaN for one seed."""
    groups: dict[tuple, list[float]] = {}
    for r in headline(rows):
        if r[metric] is not None and not math.isnan(float(r[metric])):
            groups.setdefault((r["method"], r["variant"], r["ratio"]), []).append(float(r[metric]))
    return {k: _stats(v) for k, v in groups.items()}


def gains(rows: Sequence[dict], metric: str, variant: str = "") -> dict[float, tuple[float, float, int]]:
    """ratio -> mean, sd, n over seeds of (final ILTM - the same seed's iteration 0) for one variant."""
    own_start = any(r["method"] == "transformer" and r["variant"] == variant for r in rows)
    start = _values(rows, metric, "transformer", variant if own_start else "")
    return _per_ratio(
        {key: v - start[key] for key, v in _values(rows, metric, "iltm", variant).items() if key in start}
    )


def recovery(rows: Sequence[dict], metric: str = "aupro") -> dict[str, dict[float, tuple[float, float, int]]]:
    """Paired per seed: what contamination costs iteration 0 (its value at 0 % minus at the ratio), and what the
    oracle's masks and ILTM's win back of it (each minus the same seed and ratio's iteration 0).

    A rough guide to what a target for ILTM's gain can ask: the oracle is one set of masks, not a bound, but where
    it wins back less than the target the masks are not what is missing. Every row uses the seeds with a 0 % run.
    """
    start = _values(rows, metric, "transformer", "")
    clean = {seed: v for (seed, ratio), v in start.items() if ratio == 0.0}
    paired = {key for key in start if key[1] > 0 and key[0] in clean}
    oracle, final = _values(rows, metric, "transformer", "oracle"), _values(rows, metric, "iltm", "")
    return {
        "cost": _per_ratio({key: clean[key[0]] - start[key] for key in paired}),
        "oracle": _per_ratio({key: oracle[key] - start[key] for key in paired if key in oracle}),
        "iltm": _per_ratio({key: final[key] - start[key] for key in paired if key in final}),
    }


def _values(rows: Sequence[dict], metric: str, method: str, variant: str) -> dict[tuple[int, float], float]:
    """(seed, ratio) -> the metric of a method's headline model (iteration 0, or ILTM's final iteration); models
    without the metric (None or NaN, e.g. image AUROC on a set of one class) are left out rather than averaged."""
    return {(r["seed"], r["ratio"]): float(r[metric]) for r in headline(rows) if r["method"] == method
            and r["variant"] == variant and r[metric] is not None and not math.isnan(float(r[metric]))}  # fmt: skip


def _per_ratio(differences: dict[tuple[int, float], float]) -> dict[float, tuple[float, float, int]]:
    """(seed, ratio) -> value, summarised over the seeds of each ratio."""
    by_ratio: dict[float, list[float]] = {}
    for (_, ratio), value in differences.items():
        by_ratio.setdefault(ratio, []).append(value)
    return {ratio: _stats(v) for ratio, v in sorted(by_ratio.items())}


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sd, n); sd is NaN for one value."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values)


def markdown_table(rows: Sequence[dict]) -> str:
    """Table 1 style: one table per metric, methods x contamination ratios, cells "mean +- sd" in %."""
    ratios = sorted({r["ratio"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Mean ± sd over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), in %; (n=K): a cell over fewer.", ""]
    for metric, title in TITLES.items():
        stats = summarise(rows, metric)
        lines += [f"**{title}** by training-set contamination", ""]
        lines += ["| method | " + " | ".join(f"{r:.0%}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
        for (method, variant), label in LABELS.items():
            if any(k[:2] == (method, variant) for k in stats):
                cells = [_cell(stats.get((method, variant, r)), seeds=len(seeds)) for r in ratios]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    for variant in sorted({r["variant"] for r in rows if r["method"] == "iltm"}):
        name = f" ({variant})" if variant else ""
        lines += [f"**ILTM gain{name}**: final iteration − the same seed's iteration 0, in points", ""]
        lines += ["| metric | " + " | ".join(f"{r:.0%}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
        for metric in ("aupro", "best_dice", "pixel_auroc"):
            stats = gains(rows, metric, variant)
            cells = (_cell(stats.get(r), sign=True, seeds=len(seeds)) for r in ratios)
            lines.append(f"| {TITLES[metric]} | " + " | ".join(cells) + " |")
        lines.append("")
    won = recovery(rows)
    contaminated = [r for r in ratios if r > 0]
    if won["cost"]:
        lines += ["**What contamination costs, and what masks win back**: AUPRO, paired per seed, in points", ""]
        lines += ["| | " + " | ".join(f"{r:.0%}" for r in contaminated) + " |", "|---|" + "---|" * len(contaminated)]
        for name, label in (("cost", "cost: iteration 0 at 0 % − iteration 0"),
                            ("oracle", "oracle masks win back: oracle − iteration 0"),
                            ("iltm", "ILTM wins back: final − iteration 0")):  # fmt: skip
            cells = (_cell(won[name].get(r), sign=True, seeds=len(seeds)) for r in contaminated)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def report(
    exp_dir: str = "runs/experiments", seeds: Sequence[int] | None = None, out_dir: str | None = None
) -> list[dict]:
    """results.csv, table1.md, figure4.png and figure3.png from whatever evaluations exist under exp_dir.

    `seeds`: only these seeds, e.g. the ones every method was run for, so that a table compares methods on the same
    data; `out_dir` (default exp_dir) then keeps the whole folder's report beside it.
    """
    exp_dir = os.path.abspath(exp_dir)
    if not os.path.isdir(exp_dir):
        raise FileNotFoundError(f"{exp_dir}: no such folder (the --exp_dir of python -m scripts.experiments run)")
    wanted = None if seeds is None else {int(s) for s in as_list(seeds)}
    rows = collect(exp_dir, wanted)
    if wanted is not None:
        missing = wanted - {r["seed"] for r in rows}
        if not wanted or missing:
            raise ValueError(f"{exp_dir}: no evaluations of seed(s) {sorted(missing) or 'none given'}")
    if not rows:
        raise FileNotFoundError(f"{exp_dir}: no evaluations yet (seed_S/eval/<ratio>/<model>/metrics.json)")
    out = os.path.abspath(out_dir) if out_dir else exp_dir
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_contamination(rows, os.path.join(out, "figure4.png"))
    plot_iterations(rows, os.path.join(out, "figure3.png"))
    table = markdown_table(rows) + _warned(exp_dir, {r["seed"] for r in rows})
    with open(os.path.join(out, "table1.md"), "w") as f:
        f.write(table + "\n")
    print(table, flush=True)
    return rows


def _warned(exp_dir: str, seeds: set[int]) -> str:
    """The runs whose own summary (``iltm/summary.md``, "Can ILTM help here?") warns, with the gist of each warning:
    a table of means would otherwise show a run that learned nothing as a plain "+0.0"."""
    lines = []
    for seed in sorted(seeds):
        runs = os.path.join(exp_dir, f"seed_{seed}", "runs")
        for tag in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
            path = os.path.join(runs, tag, "iltm", "summary.md")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                found = [line.split("**Warning.**", 1)[1].strip() for line in f if "**Warning.**" in line]
            if found:
                gist = "; ".join(w.split(":")[0].split(". ")[0].rstrip(".") for w in found)
                lines.append(f"- seed {seed}, {tag}: {len(found)} warning{'s' if len(found) > 1 else ''}: {gist}")
    if not lines:
        return ""
    return ("\n\n## Runs whose own summary warns\n\nEach run's `iltm/summary.md`, \"Can ILTM help here?\", says "
            "more:\n\n" + "\n".join(lines))  # fmt: skip


def compare(*evaluations: str, out: str | None = None) -> str:
    """Your own evaluations side by side, e.g. ILTM's and the baselines' on one test set: each a folder holding
    ``metrics.json`` (an evaluation's --output_dir) or the file. Evaluations that scored other labels (their
    ``data`` and ``data_section`` records differ) are refused, since their numbers do not compare; `out`: also write
    the table there (Markdown)."""
    if not evaluations:
        raise ValueError("name the evaluations to compare: folders holding metrics.json (evaluation's --output_dir)")
    results, seen = [], {}
    for given in evaluations:
        path = os.path.join(given, "metrics.json") if os.path.isdir(given) else given
        if os.path.realpath(path) in seen:
            raise ValueError(f"{given}: the same evaluation as {seen[os.path.realpath(path)]}, given twice")
        seen[os.path.realpath(path)] = given
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{given}: no metrics.json there (python -m monai.bundle run evaluating ... "
                                    "--output_dir writes it)")  # fmt: skip
        with open(path) as f:
            results.append((given, json.load(f)))
    scored = [
        (given, (_data(r["data"]), r.get("data_section"), r.get("n_images"))) for given, r in results if r.get("data")
    ]
    if len({json.dumps(v, sort_keys=True) for _, v in scored}) > 1:
        listed = "".join(f"\n  {given}: {d}, section {sec!r}, {n} images" for given, (d, sec, n) in scored)
        raise ValueError(f"these evaluations scored different labels, so their metrics do not compare:{listed}")
    lines = ["| evaluation | method | checkpoint | " + " | ".join(TITLES.values()) + " | images |",
             "|---|---|---|" + "---|" * len(TITLES) + "---|"]  # fmt: skip
    for given, r in results:
        cells = [f"{100 * r[m]:.1f}" if isinstance(r.get(m), (int, float)) else "-" for m in TITLES]
        lines.append(f"| {given} | {r.get('method', '?')} | {r.get('checkpoint', '?')} | {' | '.join(cells)} | "
                     f"{r.get('n_images', '?')} |")  # fmt: skip
    table = "\n".join(lines) + "\n\nIn %"
    data, section, _ = scored[0][1] if scored else (None, None, None)
    table += f", each on section {section!r} of {data['datalist']}." if data else "."
    unrecorded = [given for given, r in results if not r.get("data")]
    if unrecorded:  # evaluated before 0.7.4
        table += f" Not recorded which labels {', '.join(unrecorded)} scored: check that it is the same test set."
    table += "".join(_paired(evaluations[0], given) for given in evaluations[1:])
    if out:
        with open(out, "w") as f:
            f.write(table + "\n")
    print(table, flush=True)
    return table


def _paired(first: str, other: str) -> str:
    """`other` against `first`, image by image (each image's own AUPRO, ``aupro_raw.csv``): on a test set of a few
    dozen images a set-level difference can rest on a few of them, and a sign test says whether chance splits so."""
    own = [_image_aupros(given) for given in (first, other)]
    if any(x is None for x in own):  # evaluated before 0.7.6
        return f"\n\n{other} against {first}: no per-image AUPRO to pair (aupro_raw.csv, written since 0.7.6)."
    paired = [(own[0][name], value) for name, value in own[1].items() if name in own[0]]
    if not paired:
        return f"\n\n{other} against {first}: no image with anomalies in common to pair (their image names differ)."
    higher, lower = sum(b > a for a, b in paired), sum(b < a for a, b in paired)
    line = f"\n\n{other} against {first}, image by image (own AUPRO, {len(paired)} images with anomalies): "
    p = sign_test(higher, lower)
    if p is None:
        return line + "no image's AUPRO differs."
    return line + (f"higher on {higher}, lower on {lower}: {'within' if p >= SIGN_TEST else 'beyond'} chance "
                   f"(two-sided sign test, p = {p:.3g}).")  # fmt: skip


def _image_aupros(given: str) -> dict[str, float] | None:
    """An evaluation's per-image AUPRO by image name, images without one (no anomaly) left out; None without the
    file."""
    path = os.path.join(given if os.path.isdir(given) else os.path.dirname(given), "aupro_raw.csv")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = [(row["filename"], _float(row["class0"])) for row in csv.DictReader(f)]
    return {name: value for name, value in rows if not math.isnan(value)}


def _data(record: Any) -> Any:
    """An evaluation's `data` record with its paths made absolute: one datalist given two ways is one test set."""
    if not isinstance(record, dict):
        return record
    return {k: os.path.realpath(v) if k in ("datalist", "dataset_dir") and isinstance(v, str) else v
            for k, v in record.items()}  # fmt: skip


def plot_contamination(rows: Sequence[dict], path: str) -> None:
    """Figure 4: each metric against the training-set contamination, one line per method, sd over seeds as bars."""
    fig, axes = _figure(1, 4, (15, 3.6))
    ratios = sorted({r["ratio"] for r in rows})
    for ax, metric in zip(axes[0], TITLES):
        stats = summarise(rows, metric)
        for (method, variant), label in LABELS.items():
            pts = sorted((k[2], *v[:2]) for k, v in stats.items() if k[:2] == (method, variant))
            if pts:
                x, mean, sd = zip(*pts)
                ax.errorbar(x, mean, yerr=[0 if math.isnan(s) else s for s in sd], marker="o", capsize=3, label=label)
        ax.set_xlabel("anomalous training images")
        ax.set_xticks(ratios)
        ax.set_ylim(0, 1.02)
        ax.set_title(TITLES[metric], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_iterations(rows: Sequence[dict], path: str) -> None:
    """Figure 3: test AUPRO per ILTM iteration, and the training masks' and flags' precision / recall against the
    true anomalous tokens, mean over seeds, one line per ratio and threshold variant (dashed: fixed threshold)."""
    fig, axes = _figure(1, 4, (15, 3.6))
    panels = (("aupro", "test AUPRO"), ("precision", "token-mask precision"), ("recall", "token-mask recall"),
              ("flag_recall", "flag recall (resampled tokens)"))  # fmt: skip
    models = [r for r in rows if r["method"] in ("transformer", "iltm")]
    iterations = {r["iteration"] for r in models}
    for n, ratio in enumerate(sorted({r["ratio"] for r in models})):
        colour = f"C{n % 10}"  # one colour per ratio in every panel, also where a panel has no line for it
        for variant, style in (("", "o-"), ("fixed", "s--")):
            chosen = [r for r in models if r["ratio"] == ratio and r["variant"] in (variant, "")
                      and (r["variant"] == variant or r["iteration"] == 0)]  # fmt: skip
            if variant and not any(r["variant"] == variant for r in chosen):
                continue
            for ax, (key, _) in zip(axes[0], panels):
                by_k: dict[int, list[float]] = {}
                for r in chosen:
                    if r[key] is not None and not math.isnan(float(r[key])):
                        by_k.setdefault(r["iteration"], []).append(float(r[key]))
                if by_k:
                    xs = sorted(by_k)
                    ax.plot(xs, [statistics.fmean(by_k[k]) for k in xs], style, color=colour,
                            label=f"{ratio:.0%} {variant}".strip())  # fmt: skip
    for ax, (_, title) in zip(axes[0], panels):
        ax.set_xlabel("ILTM iteration")
        ax.set_xlim(min(iterations, default=0) - 0.25, max(iterations, default=1) + 0.25)  # the same in every panel
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.02)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, title="contamination", title_fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _summary(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "iltm", "summary.csv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cell(stat: tuple[float, float, int] | None, sign: bool = False, seeds: int = 1) -> str:
    """The text "mean ± sd" in %; a cell over fewer seeds than the table's (some methods or ratios) says so."""
    if stat is None:
        return "-"
    mean, sd, n = stat
    mean = round(100 * mean, 1) + 0.0  # a mean that rounds to zero reads "0.0", not "-0.0"
    text = f"{mean:+.1f}" if sign else f"{mean:.1f}"
    return text + ("" if math.isnan(sd) else f" ± {100 * sd:.1f}") + (f" (n={n})" if n < seeds else "")


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _figure(rows: int, cols: int, size: tuple[float, float]):
    fig = figure(figsize=size)
    return fig, fig.subplots(rows, cols, squeeze=False)
