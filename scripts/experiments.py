"""The paper's contamination sweep (Patel et al. 2023, §4, Figures 3-4, Table 1) on the embedded synthetic data.

For each seed and each training-set contamination ratio: generate the training set (scripts.synthetic, that
anomalous fraction, that seed), run the bundle's ILTM training with that seed, and evaluate on the seed's shared test
set (its random streams are keyed by the test split alone, so every ratio of a seed sees the same test images).
Seeds change both the data draws and the models' initialisation; the report gives mean +- sd over seeds.

Evaluated per seed and ratio (:data:`scripts.experiments_report.LABELS`):

- ``vqvae_dropout``: the ablation without resampling (original latent, decoder dropout only): what the VQ-VAE's
  reconstruction error finds on its own; ILTM can only improve on what the Transformer's healing adds.
- ``transformer``: ILTM iteration 0, the plain VQ-VAE + Transformer (``iltm/iter_00/model.pt``).
- ``iltm``: the final ILTM iteration; with ``all_iterations`` every iteration (Figure 3).
- baselines (``methods``, :data:`scripts.baselines.METHODS`): the dense AE and dense VAE, trained on the same data.
- variants (``variants``), each sharing the VQ-VAE (and iteration 0, where the variant does not change it) of the
  seed and ratio, so that a comparison isolates the one setting: ``fixed`` (a fixed resampling threshold, paper
  Fig. 3), ``unrestricted`` (the anomaly map without the prior work's restriction to flagged tokens, in training's
  masks too), ``restricted`` (the map restricted to flagged tokens, the default before 0.6.12), ``oracle`` (one
  Transformer trained with the labelled anomalous tokens masked: the upper bound of what ILTM's masks can give), and
  two that split ILTM's first masks against the labels: ``hits``
  (only those of its masks that are labelled anomalous: its recall without its false masks) and ``hits_false``
  (every labelled token and its false masks: full recall with them).

Writes under ``exp_dir``: ``seed_S/{data,runs,eval}/...``, ``results.csv`` (one row per evaluated model),
``table1.md`` (mean +- sd), ``figure4.png``, ``figure3.png``. Resumable: a finished training (``model.pt``) or
evaluation (``metrics.json``) is skipped, an interrupted training resumes; more seeds or ratios can be added later.

    python -m scripts.experiments run --seeds "[0,1]"                         # 2D demo preset, ratios 0-0.8
    python -m scripts.experiments run --kind 3d --seeds "[0,1]"               # 3D demo preset, ratios 0, 0.5, 1
    python -m scripts.experiments run --ratios "[0.0,0.8]" --variants "fixed,unrestricted,oracle" --all_iterations True
    python -m scripts.experiments run --methods "iltm,dense_ae,dense_vae" --seeds "[0,1]"  # with the baselines
    python -m scripts.experiments run --overrides "{'vqvae#epochs': 10, 'transformer#epochs': 5}"
    python -m scripts.experiments report --exp_dir runs/experiments           # tables and figures only
    python -m scripts.experiments report --exp_dir runs/experiments --seeds "[0,1]" --out_dir runs/experiments/s01
    python -m scripts.experiments compare runs/iltm_eval runs/nsa_eval      # your own evaluations of one test set
"""

from __future__ import annotations

import filecmp
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from monai.bundle import ConfigParser

from scripts.baselines import METHODS, own_overrides
from scripts.cli import UnknownSetting, as_list, fire_main, quiet, unknown_ids
from scripts.contamination import parse_names, parse_ratios, ratio_tag
from scripts.experiments_report import compare, final_iteration, report
from scripts.files import write_json
from scripts.settings import check_settings

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {"2d": "configs/demo.yaml", "3d": "configs/demo3d.yaml"}
RATIOS = {"2d": (0.0, 0.2, 0.4, 0.6, 0.8), "3d": (0.0, 0.5, 1.0)}
# variant -> (training overrides, {base} = the base run's folder; evaluation overrides; shares iteration 0); the VQ-VAE
# is always the base run's
VARIANTS = {
    "fixed": ({"iltm#fixed_threshold": True}, {}, True),
    "unrestricted": ({"restrict_to_flags": False, "iltm#mask_restrict_to_flags": False}, {"restrict_to_flags": False},
                     True),
    "restricted": ({"restrict_to_flags": True}, {"restrict_to_flags": True}, True),
    "oracle": ({"iltm#initial_masks": "labels", "iltm#max_iterations": 0}, {}, False),
    "hits": ({"iltm#initial_masks": "labels&{base}/iltm/iter_01/token_masks.pt", "iltm#max_iterations": 0}, {}, False),
    "hits_false": ({"iltm#initial_masks": "labels|{base}/iltm/iter_01/token_masks.pt", "iltm#max_iterations": 0}, {},
                   False),
}  # fmt: skip
# what determines results: a rerun with other values would mix incompatible outputs in one folder
RECORDED = ("preset", "n_train", "n_test", "overrides", "eval_overrides")
TRAINING_ONLY = ("vqvae", "transformer", "iltm")  # sections inference.yaml holds empty: evaluation never reads them


def run(
    exp_dir: str = "runs/experiments",
    kind: str = "2d",
    ratios: Sequence[float] | None = None,
    seeds: Sequence[int] | int = (0,),
    preset: str | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    variants: Sequence[str] | str = (),
    methods: Sequence[str] | str = ("iltm",),
    fixed_threshold: bool = False,
    ablation: bool = True,
    all_iterations: bool = False,
    overrides: dict[str, Any] | None = None,
    eval_overrides: dict[str, Any] | None = None,
    in_process: bool = False,
) -> list[dict]:
    """Train and evaluate every seed and ratio, then write the report; returns the result rows.

    Args:
        exp_dir: everything goes here (seed_S/data, seed_S/runs, seed_S/eval, logs/, results.csv, figures, table1.md).
        kind: "2d" (inspection textures) or "3d" (PET-like phantoms): picks the default preset and ratios.
        ratios: training-set anomalous fractions (default 0-0.8 in 2D; 0, 0.5, 1 in 3D).
        seeds: data and model seeds (``synthetic#seed`` and ``seed``); the report averages over them.
        preset: config layered on train/inference (default configs/demo.yaml or configs/demo3d.yaml).
        n_train: overrides the preset's number of synthetic training images.
        n_test: overrides the preset's number of synthetic test images (a smaller test set is faster to evaluate).
        variants: names from :data:`VARIANTS` ("fixed", "unrestricted", "restricted", "oracle", "hits", "hits_false"),
            comma-separated or a list.
        methods: "iltm" (its iteration 0, final iteration, ablation and variants) and the baselines of
            :data:`scripts.baselines.METHODS` ("dense_ae", "dense_vae", "cutpaste", "nsa", "stkd"), comma-separated or
            a list; each trained on the same data with the same seed and evaluated on the same test set.
        fixed_threshold: shorthand for the "fixed" variant.
        ablation: also evaluate the no-resampling ablation (``network_def#resample: false``).
        all_iterations: evaluate every ILTM iteration, not only iteration 0 and the final one.
        overrides: config overrides for training and evaluation, e.g. ``{'vqvae#epochs': 5}`` (keys of
            :data:`TRAINING_ONLY` sections reach training only); keys ``synthetic#...`` change the generated data.
        eval_overrides: config overrides for evaluation only.
        in_process: run the bundle in this process (faster start, for tests) instead of a subprocess per step.
    """
    if kind not in PRESETS:
        raise ValueError(f"unknown kind {kind!r}; available: {', '.join(PRESETS)}")
    preset = _preset_name(preset or PRESETS[kind])
    if not os.path.isfile(_path(preset)):
        raise FileNotFoundError(
            f"{preset}: preset not found (the bundle's are configs/demo.yaml, configs/small.yaml, ...)"
        )
    ratios = list(parse_ratios(RATIOS[kind] if ratios is None else ratios))
    seeds = _seeds(seeds)
    chosen = list(parse_names(variants))
    chosen += ["fixed"] if fixed_threshold and "fixed" not in chosen else []
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; available: {', '.join(VARIANTS)}")
    methods = list(parse_names(methods))
    unknown = sorted(set(methods) - {"iltm", *METHODS})
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown or methods}; available: iltm, {', '.join(METHODS)}")
    for name, given in (("overrides", overrides), ("eval_overrides", eval_overrides)):
        if given is not None and not isinstance(given, dict):
            raise ValueError(f"--{name} must be a dict of config ids, e.g. \"{{'vqvae#epochs': 2}}\", got {given!r}")
    overrides, eval_overrides = dict(overrides or {}), dict(eval_overrides or {})
    _check_before_any_work(preset, methods, overrides, eval_overrides)
    exp_dir = os.path.abspath(exp_dir)
    if os.path.exists(exp_dir) and not os.path.isdir(exp_dir):
        raise ValueError(f"{exp_dir}: --exp_dir is a file; pass a folder")
    _record(
        exp_dir, dict(preset=preset, n_train=n_train, n_test=n_test, overrides=overrides, eval_overrides=eval_overrides)
    )
    synthetic = synthetic_params(preset, overrides, n_train, n_test)
    model_overrides = {k: v for k, v in overrides.items() if not k.startswith("synthetic#")}
    for seed in seeds:
        root = os.path.join(exp_dir, f"seed_{seed}")
        data = dict(synthetic, seed=seed)
        test_datalist = shared_test_set(os.path.join(root, "data", "test"), data)
        for ratio in ratios:
            tag = ratio_tag(ratio)
            base = os.path.join(root, "runs", tag)
            train_data = dict(data, anomalous_fraction=ratio, n_test=0)
            common = {**model_overrides, "seed": seed}
            data_dir = os.path.join(root, "data", tag)
            for method in (m for m in methods if m != "iltm"):
                spec, folder = METHODS[method], f"{base}_{method}"
                train(
                    folder,
                    data_dir,
                    train_data,
                    preset,
                    own_overrides({**common, **spec.overrides}, method),
                    exp_dir,
                    in_process,
                    spec.layers,
                )
                evaluate(os.path.join(folder, "model.pt"), os.path.join(root, "eval", tag, method), test_datalist,
                         preset, own_overrides({**common, **eval_overrides, **spec.overrides}, method), exp_dir,
                         in_process, spec.layers)  # fmt: skip
            if "iltm" not in methods:
                continue
            common, eval_only = own_overrides(common, None), own_overrides(eval_overrides, None)
            train(base, data_dir, train_data, preset, common, exp_dir, in_process)
            runs = {"": (base, {})}
            for name in chosen:
                train_over, eval_over, share_iteration_0 = VARIANTS[name]
                folder = f"{base}_{name}"
                share_first_stage(base, folder, share_iteration_0)
                train_over = {k: v.format(base=base) if isinstance(v, str) else v for k, v in train_over.items()}
                train(folder, data_dir, train_data, preset, {**common, **train_over}, exp_dir, in_process)
                runs[name] = (folder, eval_over)
            for name, checkpoint, extra in evaluations(runs, ablation, all_iterations):
                out = os.path.join(root, "eval", tag, name)
                evaluate(checkpoint, out, test_datalist, preset, {**common, **eval_only, **extra}, exp_dir, in_process)
    return report(exp_dir)


def _seeds(seeds: Any) -> list[int]:
    """Whole, non-negative seeds: `--seeds 0.5` once ran seed 0 and `True` seed 1 without a word."""
    given = [int(s) if isinstance(s, str) and s.isdigit() else s for s in as_list(seeds)]
    wrong = [s for s in given if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if wrong or not given:
        shown = f"; got {', '.join(map(repr, wrong))}" if wrong else ""
        raise ValueError(f'--seeds must be whole numbers >= 0, e.g. --seeds "[0,1]"{shown}')
    return list(given)


def _check_before_any_work(preset: str, methods: Sequence[str], overrides: dict, eval_overrides: dict) -> None:
    """Methods not defined for the preset's dimensions and override ids no config defines stop the sweep before
    experiment.json records them (a typo would otherwise lock the folder to the misspelt overrides). The ids are
    checked where :func:`run` sends them: `overrides` to training and, but for training-only sections and the data's
    `synthetic#...`, to evaluation; `eval_overrides` to evaluation."""
    train_files = [_path("configs/train.yaml"), _path(preset)]
    parser = ConfigParser()
    parser.read_config(train_files)
    dims = overrides.get("spatial_dims", parser["spatial_dims"])
    wrong = [m for m in methods if m != "iltm" and dims not in METHODS[m].dims]
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: not defined for spatial_dims {dims} ({preset}); leave them out")
    evaluated = {k: v for k, v in overrides.items() if k.split("#", 1)[0] not in (*TRAINING_ONLY, "synthetic")}
    problems = []
    for method in methods:
        layers = [_path(f) for f in (METHODS[method].layers if method != "iltm" else ())]
        own = None if method == "iltm" else method
        evaluation = [_path(f) for f in ("configs/inference.yaml", preset, "configs/evaluate.yaml")] + layers
        for argument, files, given in (("overrides", train_files + layers, overrides),
                                       ("overrides", evaluation, evaluated),
                                       ("eval_overrides", evaluation, eval_overrides)):  # fmt: skip
            problems += [
                p.replace("--", f"--{argument} ", 1) for p in unknown_ids(files, list(own_overrides(given, own)))
            ]
    if problems:
        raise UnknownSetting("\n".join(dict.fromkeys(problems)))
    check_settings(overrides, eval_overrides)  # values too: a value training refuses would lock the folder to it


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
    """One test set for every ratio of a seed: the preset's test split alone (no training images), generated once."""
    from scripts.synthetic import ensure_dataset

    params = {k: v for k, v in synthetic.items() if k != "kind"}
    return ensure_dataset(folder, synthetic.get("kind", "2d"), **{**params, "n_train": 0, "n_val": 0})


def train(
    output_dir: str,
    dataset_dir: str,
    synthetic: dict,
    preset: str,
    overrides: dict,
    exp_dir: str,
    in_process: bool,
    layers: Sequence[str] = (),
) -> None:
    """The bundle's training for one ratio (VQ-VAE + ILTM, or a baseline's `layers`); skipped when its final model.pt
    exists."""
    if os.path.isfile(os.path.join(output_dir, "model.pt")):
        return
    args = {
        "dataset_dir": dataset_dir,
        "output_dir": output_dir,
        "synthetic": synthetic,
        "iltm#export": "",
        **overrides,
    }
    configs, run_id = ["configs/train.yaml", preset, *layers], "train_baseline" if layers else "training"
    bundle(run_id, configs, args, _log(exp_dir, output_dir), in_process)


def share_first_stage(source: str, target: str, iteration_0: bool = True) -> None:
    """Seed a variant's run with the source run's VQ-VAE and, if the variant does not change it, iteration 0.

    The training resumes from them (state.json steps ``vqvae`` and ``transformer_00``), so both runs start from
    the same models and initial weights, and the comparison isolates the variant's setting.
    """
    if os.path.exists(os.path.join(target, "state.json")):
        return
    with open(os.path.join(source, "state.json")) as f:
        steps = json.load(f)
    shared = ("vqvae", "tokens", os.path.join("iltm", "iter_00")) if iteration_0 else ("vqvae", "tokens")
    for sub in shared:
        shutil.copytree(os.path.join(source, sub), os.path.join(target, sub), dirs_exist_ok=True)
    os.makedirs(os.path.join(target, "iltm"), exist_ok=True)
    shutil.copy2(
        os.path.join(source, "iltm", "transformer_init.pt"), os.path.join(target, "iltm", "transformer_init.pt")
    )
    done = ("vqvae", "transformer_00") if iteration_0 else ("vqvae",)
    write_json(os.path.join(target, "state.json"), {k: v for k, v in steps.items() if k in done})


def evaluations(runs: dict[str, tuple[str, dict]], ablation: bool, all_iterations: bool) -> list[tuple[str, str, dict]]:
    """(name, checkpoint, config overrides) of every model to evaluate; names are eval/<ratio>/ folder names.

    ``runs`` maps a variant ("" = the base run) to its folder and evaluation overrides. A variant's iteration 0 is
    evaluated when it is its own model (the oracle) or the variant changes evaluation; otherwise it is the base's.
    """
    base = runs[""][0]
    out = [("vqvae_dropout", _iteration_model(base, 0), {"network_def#resample": False})] if ablation else []
    for variant, (folder, extra) in runs.items():
        final = final_iteration(folder)
        chosen = range(final + 1) if all_iterations else sorted({0, final})
        prefix = f"{variant}_" if variant else ""
        own_start = variant and (
            variant in VARIANTS
            and not VARIANTS[variant][2]  # trains its own iteration 0, even if to the same weights
            or not filecmp.cmp(_iteration_model(folder, 0), _iteration_model(base, 0), shallow=False)
        )
        out += [(f"{prefix}iter_{k:02d}", _iteration_model(folder, k), dict(extra))
                for k in chosen if not variant or k > 0 or extra or own_start]  # fmt: skip
    return out


def evaluate(
    checkpoint: str,
    output_dir: str,
    datalist: str,
    preset: str,
    overrides: dict,
    exp_dir: str,
    in_process: bool,
    layers: Sequence[str] = (),
) -> None:
    """The bundle's evaluation of one checkpoint on the shared test set; skipped when its metrics.json exists.
    Overrides of training-only sections (e.g. `iltm#mask_resample_threshold`) reach training only: evaluation's
    configs would refuse an id the preset does not set."""
    if os.path.isfile(os.path.join(output_dir, "metrics.json")):
        return
    overrides = {k: v for k, v in overrides.items() if k.split("#", 1)[0] not in TRAINING_ONLY}
    args = {
        "dataset_dir": os.path.dirname(datalist), "datalist": datalist, "checkpoint": checkpoint,
        "output_dir": output_dir, "save_maps": False, "save_overlays": False, **overrides,
    }  # fmt: skip
    configs = ["configs/inference.yaml", preset, "configs/evaluate.yaml", *layers]
    bundle("evaluating", configs, args, _log(exp_dir, output_dir), in_process)


def shell_line(args: Sequence[str]) -> str:
    """The arguments as one shell line to copy, with config literals in double quotes where that is as safe:
    shlex alone writes `--synthetic={'kind': '2d'}` as `'--synthetic={'"'"'kind'"'"': '"'"'2d'"'"'}'`."""

    def quoted(arg: str) -> str:
        return f'"{arg}"' if "'" in arg and not set(arg) & set('"$`\\!') else shlex.quote(arg)

    return " ".join(map(quoted, args))


def bundle(run_id: str, configs: Sequence[str], overrides: dict, log: str, in_process: bool) -> None:
    """``python -m monai.bundle run <run_id>`` with config overrides, printed so that it can be rerun by hand."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", repr(list(configs))]
    cmd += [f"--{k}={v!r}" for k, v in overrides.items()]  # fire reads Python literals
    print(f"[experiments] python {shell_line(cmd[1:])}", flush=True)
    start = time.time()
    os.makedirs(os.path.dirname(log), exist_ok=True)
    if in_process:
        from monai.bundle import run as bundle_run

        bundle_run(run_id, config_file=[_path(c) for c in configs], **overrides)
    else:
        with open(log, "a") as f:  # a rerun after a kill keeps the killed attempt's log above its own
            f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} python {shell_line(cmd[1:])}\n")
            f.flush()
            code = subprocess.call(cmd, cwd=BUNDLE_ROOT, stdout=f, stderr=subprocess.STDOUT)
        if code:
            with open(log) as f:
                tail = "".join(f.readlines()[-30:])
            raise RuntimeError(f"{run_id} failed (exit {code}); last lines of {log}:\n{tail}")
    print(f"[experiments] {run_id} done in {time.time() - start:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------- helpers


def _iteration_model(run_dir: str, k: int) -> str:
    return os.path.join(run_dir, "iltm", f"iter_{k:02d}", "model.pt")


def _record(exp_dir: str, params: dict) -> None:
    """experiment.json: a rerun into the same folder must use the same settings, or results would mix."""
    os.makedirs(exp_dir, exist_ok=True)
    path = os.path.join(exp_dir, "experiment.json")
    params = json.loads(json.dumps(params))
    if os.path.isfile(path):
        with open(path) as f:
            recorded = json.load(f)
        if isinstance(recorded.get("preset"), str):  # recorded before 0.6.3 as given: absolute, "./configs/..."
            recorded["preset"] = _preset_name(recorded["preset"])
        changed = []
        for k in (k for k in RECORDED if recorded.get(k) != params.get(k)):
            now, then = params.get(k), recorded.get(k)
            if isinstance(now, dict) and isinstance(then, dict):  # overrides: the ids that differ, not both dicts
                changed += [f"{k}[{i!r}]={now.get(i, '(unset)')!r} (recorded {then.get(i, '(unset)')!r})"
                            for i in sorted({*now, *then}) if now.get(i) != then.get(i)]  # fmt: skip
            else:
                changed.append(f"{k}={now!r} (recorded {then!r})")
        if changed:
            raise ValueError(
                f"{exp_dir} holds an experiment with other settings: {', '.join(changed)}; use another exp_dir"
            )
        return
    write_json(path, params)


def _preset_name(preset: str) -> str:
    """One name for one preset file in experiment.json: relative to the bundle when it lies inside it."""
    path = os.path.abspath(_path(preset))
    return os.path.relpath(path, BUNDLE_ROOT).replace(os.sep, "/") if path.startswith(BUNDLE_ROOT + os.sep) else preset


def _log(exp_dir: str, output_dir: str) -> str:
    return os.path.join(exp_dir, "logs", os.path.relpath(output_dir, exp_dir).replace(os.sep, "__") + ".log")


def _path(config: str) -> str:
    return config if os.path.isabs(config) else os.path.join(BUNDLE_ROOT, config)


def main() -> None:
    fire_main({"run": quiet(run), "report": quiet(report), "compare": quiet(compare)})


if __name__ == "__main__":
    main()
