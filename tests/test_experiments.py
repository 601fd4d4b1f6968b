"""scripts/experiments.py: the shared test set, the list of evaluations, the report, resumability, and one tiny
end-to-end run (one ratio, one epoch per stage, one ILTM iteration, a tiny detector) through the bundle's own
training and evaluation. The same run through subprocesses (the default) is a slow test (RUN_SLOW=1).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from tiny import TINY_DETECTOR

from scripts import experiments, experiments_report
from scripts.synthetic import make_2d, make_3d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
run_slow = pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="slow (minutes on CPU); set RUN_SLOW=1")

TINY = {"synthetic#n_val": 2, "vqvae#epochs": 1, "transformer#epochs": 1, "iltm#max_iterations": 1, **TINY_DETECTOR}


def _test_split(folder: str) -> dict[str, bytes]:
    with open(os.path.join(folder, "datalist.json")) as f:
        entries = json.load(f)["test"]
    files = {}
    for e in entries:
        for key in ("image", "label"):
            with open(os.path.join(folder, e[key]), "rb") as f:
                files[e[key]] = f.read()
    return files


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_test_split_does_not_depend_on_the_training_set(kind: str, tmp_path) -> None:
    """Byte-identical test images and masks whatever the training fraction and size (also none: the shared set)."""
    make = make_2d if kind == "2d" else make_3d
    sizes = {"image_size": 32} if kind == "2d" else {"grid": (12, 12, 24)}
    splits = []
    for i, (n_train, fraction) in enumerate([(3, 0.0), (4, 1.0), (0, 0.4)]):
        out = str(tmp_path / str(i))
        make(out, n_train=n_train, n_val=min(n_train, 1), n_test=3, anomalous_fraction=fraction, preview=False, **sizes)
        splits.append(_test_split(out))
    assert splits[0] == splits[1] == splits[2]


def test_synthetic_params_follow_preset_and_overrides() -> None:
    params = experiments.synthetic_params("configs/demo3d.yaml", {"synthetic#n_val": 2, "vqvae#epochs": 1}, 8, None)
    assert params["kind"] == "3d" and params["n_train"] == 8 and params["n_val"] == 2 and params["n_test"] == 16
    assert "epochs" not in params and params["preview"] is False


def _fake_run(run_dir: str, final: int, precision: list[float]) -> None:
    os.makedirs(os.path.join(run_dir, "iltm"), exist_ok=True)
    for k in range(final + 1):
        os.makedirs(os.path.join(run_dir, "iltm", f"iter_{k:02d}"), exist_ok=True)
        open(os.path.join(run_dir, "iltm", f"iter_{k:02d}", "model.pt"), "w").close()
    with open(os.path.join(run_dir, "iltm", "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["iteration", "masked_pct", "precision", "recall", "trained"])
        w.writeheader()
        for k in range(final + 1):
            p = "nan" if k == 0 else precision[k - 1]
            w.writerow(
                {
                    "iteration": k,
                    "masked_pct": 3.0 * k,
                    "precision": p,
                    "recall": p,
                    "trained": "final" if k == final else "yes",
                }
            )


def _fake_eval(exp_dir: str, seed: int, tag: str, name: str, checkpoint: str, aupro: float) -> None:
    out = os.path.join(exp_dir, f"seed_{seed}", "eval", tag, name)
    os.makedirs(out)
    result = {"aupro": aupro, "best_dice": aupro / 2, "pixel_auroc": 0.9, "image_auroc": None, "n_images": 4,
              "dice_at_density_threshold": 0.1, "checkpoint": checkpoint}  # fmt: skip
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(result, f)


def test_evaluations_cover_ablation_baseline_final_and_variants(tmp_path) -> None:
    base, fixed, free, oracle = (str(tmp_path / f"r0.40{s}") for s in ("", "_fixed", "_unrestricted", "_oracle"))
    _fake_run(base, 2, [0.5, 0.6])
    _fake_run(fixed, 3, [0.5, 0.55, 0.6])
    _fake_run(free, 1, [0.5])
    _fake_run(oracle, 0, [])
    with open(os.path.join(oracle, "iltm", "iter_00", "model.pt"), "w") as f:
        f.write("its own iteration 0")
    off = {"restrict_to_flags": False}
    runs = {"": (base, {}), "fixed": (fixed, {}), "unrestricted": (free, off), "oracle": (oracle, {})}
    names = {n: (c, o) for n, c, o in experiments.evaluations(runs, True, False)}
    assert set(names) == {"vqvae_dropout", "iter_00", "iter_02", "fixed_iter_03", "unrestricted_iter_00",
                          "unrestricted_iter_01", "oracle_iter_00"}  # fmt: skip
    assert names["vqvae_dropout"] == (
        os.path.join(base, "iltm", "iter_00", "model.pt"),
        {"network_def#resample": False},
    )
    assert names["unrestricted_iter_00"] == (os.path.join(free, "iltm", "iter_00", "model.pt"), off)
    every = [n for n, _, _ in experiments.evaluations({"": (base, {})}, False, True)]
    assert every == ["iter_00", "iter_01", "iter_02"]


def test_report_tables_and_figures_with_seeds(tmp_path, capsys) -> None:
    exp = str(tmp_path)
    for seed in (0, 1):
        for ratio, final in ((0.0, 1), (0.8, 2)):
            tag = experiments.ratio_tag(ratio)
            run_dir = os.path.join(exp, f"seed_{seed}", "runs", tag)
            _fake_run(run_dir, final, [0.3, 0.7])
            _fake_eval(exp, seed, tag, "vqvae_dropout", os.path.join(run_dir, "iltm/iter_00/model.pt"), 0.5)
            for k in range(final + 1):
                score = 0.6 + 0.1 * k + 0.02 * seed
                _fake_eval(exp, seed, tag, f"iter_{k:02d}", os.path.join(run_dir, f"iltm/iter_{k:02d}/model.pt"), score)
    rows = experiments.report(exp)
    assert [(r["ratio"], r["method"], r["iteration"], r["final"]) for r in rows if r["seed"] == 0] == [
        (0.0, "vqvae_dropout", 0, False), (0.0, "transformer", 0, False), (0.0, "iltm", 1, True),
        (0.8, "vqvae_dropout", 0, False), (0.8, "transformer", 0, False), (0.8, "iltm", 1, False),
        (0.8, "iltm", 2, True),
    ]  # fmt: skip
    assert rows[-1]["precision"] == pytest.approx(0.7) and rows[-1]["checkpoint"].startswith("seed_1/runs/r0.80")
    table = open(os.path.join(exp, "table1.md")).read()
    assert "over 2 seed(s)" in table
    # AUPRO of the final iteration: seeds give 70 and 72 at 0 %, 80 and 82 at 80 % -> mean ± sd
    assert "| ILTM (final iteration) | 71.0 ± 1.4 | 81.0 ± 1.4 |" in table
    # gain = final - the same seed's iteration 0: +10 at 0 %, +20 at 80 %, the same for both seeds (sd 0)
    assert "| AUPRO | +10.0 ± 0.0 | +20.0 ± 0.0 |" in table
    assert "| image AUROC |" not in table.split("ILTM gain")[1]  # undefined image AUROC is not a gain row
    assert "Runs whose own summary warns" not in table
    with open(
        os.path.join(exp, "seed_1", "runs", "r0.80", "iltm", "summary.md"), "w"
    ) as f:  # a run that learned nothing
        f.write("## Can ILTM help here?\n\n- **Warning.** The codebook has collapsed: 3 of 128 codes in use, so ...\n"
                "- **Warning.** ILTM masked no training token in any pass, so a retraining ...\n")  # fmt: skip
    experiments.report(exp)
    warned = open(os.path.join(exp, "table1.md")).read().split("## Runs whose own summary warns")[1]
    assert (
        "- seed 1, r0.80: 2 warnings: The codebook has collapsed; ILTM masked no training token in any pass" in warned
    )
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        experiments.report(str(tmp_path / "nowhere"))
    # a third seed at 80 % only: the 0 % cells, over two of the three seeds, say so
    run_dir = os.path.join(exp, "seed_2", "runs", "r0.80")
    _fake_run(run_dir, 1, [0.3])
    for k in range(2):
        _fake_eval(
            exp, 2, "r0.80", f"iter_{k:02d}", os.path.join(run_dir, f"iltm/iter_{k:02d}/model.pt"), 0.6 + 0.1 * k
        )
    experiments.report(exp)
    table = open(os.path.join(exp, "table1.md")).read()
    assert "over 3 seed(s)" in table
    assert "| ILTM (final iteration) | 71.0 ± 1.4 (n=2) | 77.3 ± 6.4 |" in table
    assert "| AUPRO | +10.0 ± 0.0 (n=2) | +16.7 ± 5.8 |" in table  # the gains too
    # the seeds every ratio has, reported into their own folder: the whole folder's report stays
    experiments.report(exp, seeds="[0,1]", out_dir=os.path.join(exp, "seeds01"))
    assert (
        "| ILTM (final iteration) | 71.0 ± 1.4 | 81.0 ± 1.4 |" in open(os.path.join(exp, "seeds01", "table1.md")).read()
    )
    assert open(os.path.join(exp, "table1.md")).read() == table
    with open(os.path.join(exp, "results.csv")) as f:
        assert {row["seed"] for row in csv.DictReader(f)} == {"0", "1", "2"}
    with open(os.path.join(exp, "seeds01", "results.csv")) as f:
        assert {row["seed"] for row in csv.DictReader(f)} == {"0", "1"}
    for name in ("figure3.png", "figure4.png"):
        assert os.path.getsize(os.path.join(exp, "seeds01", name)) > 0
    # an evaluation whose training folder is gone is left out, and named; other seeds' folders are not even read
    shutil.rmtree(os.path.join(exp, "seed_2", "runs"))
    experiments.report(exp, seeds="[0,1]", out_dir=os.path.join(exp, "seeds01"))
    assert capsys.readouterr().err == ""
    rows = experiments.report(exp)
    assert {r["seed"] for r in rows} == {0, 1}
    assert "seed_2/eval/r0.80/iter_00/metrics.json: left out, its training run is gone" in capsys.readouterr().err
    with open(os.path.join(exp, "seed_1", "eval", "r0.80", "iter_01", "metrics.json"), "w") as f:
        f.write("{")
    with pytest.raises(ValueError, match="r0.80/iter_01/metrics.json: unreadable"):
        experiments.report(exp)
    with pytest.raises(ValueError, match=r"seed\(s\) \[7\]"):
        experiments.report(exp, seeds=[7], out_dir=os.path.join(exp, "none"))
    with pytest.raises(ValueError, match="none given"):
        experiments.report(exp, seeds=[], out_dir=os.path.join(exp, "none"))
    assert not os.path.exists(os.path.join(exp, "none"))
    for name in ("results.csv", "figure3.png", "figure4.png"):
        assert os.path.getsize(os.path.join(exp, name)) > 0


def test_report_says_what_contamination_costs_and_what_masks_win_back(tmp_path) -> None:
    """Cost = the seed's iteration 0 at 0 % minus at the ratio; the oracle and ILTM rows are minus the same seed and
    ratio's iteration 0. Every row uses the seeds with a clean run, so the rows compare; 0 % is never a win-back."""
    exp = str(tmp_path)
    # (seed, ratio) -> iteration 0, ILTM final, oracle (AUPRO); seed 2 has no clean run, seed 0 an oracle at 0 %
    runs = {(0, 0.0): (0.80, 0.81, 0.85), (0, 0.8): (0.70, 0.72, 0.78), (1, 0.0): (0.60, 0.60, None),
            (1, 0.8): (0.56, 0.60, 0.60), (2, 0.8): (0.10, 0.90, 0.90)}  # fmt: skip
    for (seed, ratio), (start, final, oracle) in runs.items():
        tag = experiments.ratio_tag(ratio)
        run_dir = os.path.join(exp, f"seed_{seed}", "runs", tag)
        _fake_run(run_dir, 1, [0.5])
        _fake_eval(exp, seed, tag, "iter_00", os.path.join(run_dir, "iltm/iter_00/model.pt"), start)
        _fake_eval(exp, seed, tag, "iter_01", os.path.join(run_dir, "iltm/iter_01/model.pt"), final)
        if oracle is not None:
            _fake_run(run_dir + "_oracle", 0, [])
            _fake_eval(exp, seed, tag, "oracle_iter_00", os.path.join(run_dir + "_oracle", "model.pt"), oracle)
    won = experiments_report.recovery(experiments_report.collect(exp))
    assert won["cost"] == {0.8: (pytest.approx(0.07), pytest.approx(0.04242641), 2)}  # 10 and 4 points
    assert won["oracle"] == {0.8: (pytest.approx(0.06), pytest.approx(0.02828427), 2)}  # 8 and 4
    assert won["iltm"] == {0.8: (pytest.approx(0.03), pytest.approx(0.01414214), 2)}  # 2 and 4
    table = experiments_report.markdown_table(experiments_report.collect(exp)).split("What contamination costs")[1]
    assert "| cost: iteration 0 at 0 % − iteration 0 | +7.0 ± 4.2 (n=2) |" in table
    assert "| oracle masks win back: oracle − iteration 0 | +6.0 ± 2.8 (n=2) |" in table
    assert "| ILTM wins back: final − iteration 0 | +3.0 ± 1.4 (n=2) |" in table


def test_gains_pair_each_variant_with_its_own_iteration_0(tmp_path) -> None:
    """A variant that retrains iteration 0 (unrestricted) is paired with its own, one that does not (fixed) with the
    base run's; only the final iteration counts, not a later one on disk; a missing (NaN) metric leaves a seed out."""
    exp, tag = str(tmp_path), "r0.80"
    for seed, final in ((0, 0.70), (1, float("nan"))):
        base = os.path.join(exp, f"seed_{seed}", "runs", tag)
        _fake_run(base, 1, [0.5])
        for name, score in (("iter_00", 0.60), ("iter_01", final), ("iter_02", 0.99)):  # iteration 2: not final
            _fake_eval(exp, seed, tag, name, os.path.join(base, f"iltm/{name}/model.pt"), score)
        for variant, scores in (("fixed", {"iter_01": 0.75}), ("unrestricted", {"iter_00": 0.50, "iter_01": 0.58})):
            _fake_run(f"{base}_{variant}", 1, [0.5])
            for name, score in scores.items():
                _fake_eval(exp, seed, tag, f"{variant}_{name}", os.path.join(base, f"{variant}/{name}.pt"), score)
    rows = experiments_report.collect(exp)
    own = experiments_report.gains(rows, "aupro")
    assert own[0.8][0] == pytest.approx(0.10) and own[0.8][2] == 1  # seed 1's NaN is left out, iteration 2 unused
    assert experiments_report.gains(rows, "aupro", "fixed") == {0.8: (pytest.approx(0.15), pytest.approx(0.0), 2)}
    assert experiments_report.gains(rows, "aupro", "unrestricted") == {
        0.8: (pytest.approx(0.08), pytest.approx(0.0), 2)
    }


def test_training_only_overrides_reach_training_only(tmp_path, monkeypatch) -> None:
    """`--overrides "{'iltm#mask_resample_threshold': 0.05}"` is a training setting the evaluation configs refuse
    (the demo preset does not set it); the evaluation command gets the model's settings without it."""
    from scripts import experiments
    from scripts.cli import unknown_ids

    calls = []
    monkeypatch.setattr(experiments, "bundle", lambda run_id, configs, args, log, in_process: calls.append(args))
    overrides = {"iltm#mask_resample_threshold": 0.05, "transformer#epochs": 1, "num_samples": 2, "seed": 0}
    experiments.evaluate("model.pt", str(tmp_path / "eval"), str(tmp_path / "test" / "datalist.json"),
                         "configs/demo.yaml", overrides, str(tmp_path), True)  # fmt: skip
    (args,) = calls
    assert args["num_samples"] == 2 and args["seed"] == 0
    assert "iltm#mask_resample_threshold" not in args and "transformer#epochs" not in args
    configs = [os.path.join(ROOT, c) for c in ("configs/inference.yaml", "configs/demo.yaml", "configs/evaluate.yaml")]
    assert unknown_ids(configs, ["iltm#mask_resample_threshold"])  # what the evaluation would have refused


def test_printed_commands_read_as_written_and_rerun_as_run() -> None:
    """The runner prints each bundle command to be copied: config literals in double quotes, and a shell that
    splits the line gets back the very arguments, also where double quotes would not be safe."""
    args = ["-m", "monai.bundle", "run", "training", "--config_file", repr(["configs/train.yaml", "configs/demo.yaml"]),
            "--synthetic=" + repr({"kind": "2d", "seed": 0}), "--dataset_dir='a b'", "--x=$HOME's", "--y=\"it's\"",
            "--z=plain", "--w=a b"]  # fmt: skip
    line = experiments.shell_line(args)
    assert f'--config_file "{args[5]}" "{args[6]}"' in line  # as written in the docs
    assert shlex.split(line) == args


@pytest.mark.parametrize(
    "arguments, says",
    [({"kind": "4d"}, "unknown kind '4d'; available: 2d, 3d"), ({"seeds": "[]"}, "--seeds must be whole numbers >= 0"),
     ({"seeds": 0.5}, "got 0.5"), ({"seeds": True}, "got True"), ({"seeds": "abc"}, "got 'abc'"), ({"seeds": -1}, "got -1"),
     ({"overrides": {"vqvae#epochs": 0}}, "vqvae#epochs must be >= 1, got 0"),  # a value training refuses: before
     ({"overrides": "vqvae#epochs=2"}, "--overrides must be a dict of config ids"),  # experiment.json records it
     ({"ratios": "[1.5]"}, r"must be in \[0, 1\], got \[1.5\]"), ({"ratios": "[0.333,0.334]"}, "share a file name"),
     ({"kind": "3d", "methods": "nsa,cutpaste"}, "cutpaste: not defined for spatial_dims 3"),
     ({"methods": "iltm,nsa", "overrides": {"nsa#epoch": 1}}, "--overrides nsa#epoch: no such setting.*nsa#epochs"),
     ({"eval_overrides": {"num_sample": 1}}, "--eval_overrides num_sample: no such setting"),
     ({"overrides": {"resume": True}}, "--overrides resume: a training setting .*: inference and evaluation do not")],
)  # fmt: skip
def test_bad_arguments_stop_the_sweep_before_anything_is_written(tmp_path, arguments, says, monkeypatch) -> None:
    monkeypatch.setattr(experiments, "bundle", lambda *a, **k: pytest.fail("a bad argument reached the bundle"))
    with pytest.raises(ValueError, match=says):
        experiments.run(exp_dir=str(tmp_path / "exp"), **arguments)
    assert not (tmp_path / "exp").exists()


def test_an_exp_dir_that_is_a_file_is_refused(tmp_path) -> None:
    (tmp_path / "exp").write_text("")
    with pytest.raises(ValueError, match="exp: --exp_dir is a file; pass a folder"):
        experiments.run(exp_dir=str(tmp_path / "exp"))


def test_a_rerun_with_other_settings_is_refused(tmp_path) -> None:
    experiments._record(str(tmp_path), {"preset": "configs/demo.yaml", "n_test": 4})
    experiments._record(str(tmp_path), {"preset": "configs/demo.yaml", "n_test": 4})
    with pytest.raises(ValueError, match="n_test"):
        experiments._record(str(tmp_path), {"preset": "configs/demo.yaml", "n_test": 8})
    same = tmp_path / "same"  # one preset file, however it was named then and now
    experiments._record(str(same), {"preset": os.path.join(experiments.BUNDLE_ROOT, "configs", "demo.yaml")})
    experiments._record(str(same), {"preset": experiments._preset_name("./configs/demo.yaml")})
    other = tmp_path / "other"
    experiments._record(str(other), {"overrides": {"vqvae#epochs": 2, "seed": 1}})
    with pytest.raises(ValueError, match=r"overrides\['vqvae#epochs'\]=3 \(recorded 2\); use another exp_dir"):
        experiments._record(str(other), {"overrides": {"vqvae#epochs": 3, "seed": 1}})


def test_end_to_end_tiny_and_resumable(tmp_path) -> None:
    """Training (VQ-VAE, iteration 0, one ILTM iteration) and three evaluations; a rerun redoes nothing."""
    exp = str(tmp_path / "exp")
    options = dict(exp_dir=exp, ratios=[0.8], n_train=8, n_test=4, overrides=TINY, variants="oracle,hits,hits_false",
                   in_process=True)  # fmt: skip
    rows = experiments.run(**options)
    assert {(r["method"], r["iteration"], r["variant"]) for r in rows} == {
        ("vqvae_dropout", 0, ""), ("transformer", 0, ""), ("iltm", 1, ""), ("transformer", 0, "oracle"),
        ("transformer", 0, "hits"), ("transformer", 0, "hits_false")}  # fmt: skip
    runs = os.path.join(exp, "seed_0", "runs")
    for variant, combine in (("hits", "&"), ("hits_false", "|")):  # ILTM's first masks against the labels
        with open(os.path.join(runs, f"r0.80_{variant}", "run.json")) as f:
            recorded = json.load(f)["settings"]["iltm#initial_masks"]
        assert recorded == f"labels{combine}{os.path.join(runs, 'r0.80')}/iltm/iter_01/token_masks.pt"
    given = {}  # row 0 of each variant's summary: the masks its iteration 0 trained with
    for variant in ("oracle", "hits", "hits_false"):
        with open(os.path.join(runs, f"r0.80_{variant}", "state.json")) as f:
            given[variant] = json.load(f)["masks_00"]
    assert given["oracle"]["masked_tokens"] > 0 and given["oracle"]["source"] == "labels"
    assert given["oracle"]["precision"] == given["oracle"]["recall"] == given["hits_false"]["recall"] == 1.0
    assert given["hits"]["precision"] in (1.0, None)  # None: ILTM's first masks caught no labelled token
    assert given["hits"]["masked_tokens"] <= given["oracle"]["masked_tokens"] <= given["hits_false"]["masked_tokens"]
    with open(os.path.join(runs, "r0.80_oracle", "iltm", "summary.csv")) as f:
        row0 = next(csv.DictReader(f))
    assert int(row0["masked_tokens"]) == given["oracle"]["masked_tokens"] and row0["threshold"] == ""
    oracle = torch.load(os.path.join(exp, "seed_0", "runs", "r0.80_oracle", "model.pt"), weights_only=True)["model"]
    base = torch.load(os.path.join(exp, "seed_0", "runs", "r0.80", "iltm", "iter_00", "model.pt"), weights_only=True)[
        "model"
    ]
    assert torch.equal(oracle["vqvae.decoder.blocks.0.conv.weight"], base["vqvae.decoder.blocks.0.conv.weight"])
    assert not all(torch.equal(oracle[k], base[k]) for k in base if k.startswith("transformer."))  # masked training
    assert all(r["n_images"] == 4 and r["aupro"] is not None and r["seed"] == 0 for r in rows)
    with open(os.path.join(exp, "seed_0", "data", "r0.80", "datalist.json")) as f:
        training = json.load(f)["training"]
    assert sum(e["anomalous"] for e in training) == round(0.8 * 8)
    outputs = (
        os.path.join(exp, "seed_0", "runs", "r0.80", "model.pt"),
        os.path.join(exp, "seed_0", "eval", "r0.80", "iter_01", "metrics.json"),
    )
    stamps = {p: os.path.getmtime(p) for p in outputs}
    assert json.dumps(experiments.run(**options)) == json.dumps(rows)  # NaN-safe comparison
    assert stamps == {p: os.path.getmtime(p) for p in stamps}


def test_baselines_beside_iltm_with_their_own_settings(tmp_path) -> None:
    """--methods trains and evaluates the dense AE and VAE on the same data and test set; their settings (dense#...)
    do not reach the ILTM run; the table has their rows; a rerun redoes nothing."""
    exp = str(tmp_path / "exp")
    dense = {"dense#channels": [8, 16], "dense#strides": [2, 2], "dense#latent_size": 16, "dense#epochs": 1}
    options = dict(exp_dir=exp, ratios=[0.4], n_train=8, n_test=4, overrides={**TINY, **dense}, ablation=False,
                   methods="dense_ae,dense_vae,iltm", in_process=True)  # fmt: skip
    rows = experiments.run(**options)
    assert [(r["method"], r["final"]) for r in rows] == [
        ("dense_ae", True), ("dense_vae", True), ("transformer", False), ("iltm", True)]  # fmt: skip
    assert all(r["n_images"] == 4 and r["aupro"] is not None for r in rows)
    table = open(os.path.join(exp, "table1.md")).read()
    assert "| Dense AE (Baur et al.) |" in table and "| Dense VAE (Baur et al.) |" in table
    vae = torch.load(os.path.join(exp, "seed_0", "runs", "r0.40_dense_vae", "model.pt"), weights_only=True)
    assert vae["settings"]["autoencoder_def#variational"] is True
    assert vae["settings"]["autoencoder_def#channels"] == [8, 16]
    stamp = os.path.getmtime(os.path.join(exp, "seed_0", "eval", "r0.40", "dense_ae", "metrics.json"))
    assert json.dumps(experiments.run(**options)) == json.dumps(rows)
    assert stamp == os.path.getmtime(os.path.join(exp, "seed_0", "eval", "r0.40", "dense_ae", "metrics.json"))
    with pytest.raises(ValueError, match="unknown method"):
        experiments.run(**{**options, "methods": "patchcore"})


@pytest.mark.slow
@run_slow
def test_command_line_tiny(tmp_path) -> None:
    """The documented command, with subprocesses per step, two seeds, both variants and every iteration."""
    cmd = [sys.executable, "-m", "scripts.experiments", "run", "--exp_dir", str(tmp_path), "--ratios", "[0.4]",
           "--seeds", "[0,1]", "--n_train", "8", "--n_test", "4", "--variants", "fixed,unrestricted,oracle",
           "--all_iterations", "True", "--overrides", repr(TINY)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    with open(os.path.join(tmp_path, "results.csv")) as f:
        found = {(r["seed"], r["method"], r["variant"]) for r in csv.DictReader(f)}
    expected = {("vqvae_dropout", ""), ("transformer", ""), ("iltm", ""), ("iltm", "fixed"),
                ("transformer", "unrestricted"), ("iltm", "unrestricted"), ("transformer", "oracle")}  # fmt: skip
    assert found == {(str(seed), *m) for seed in (0, 1) for m in expected}


def test_command_line_help_shows_the_options(monkeypatch, capsys) -> None:
    """`run --help` documents the real options (the command wraps `run` so that fire does not echo its rows)."""
    from scripts import experiments

    monkeypatch.setenv("PAGER", "cat")
    for command, option in (("run", "--seeds"), ("report", "--exp_dir")):
        monkeypatch.setattr(sys, "argv", ["experiments", command, "--help"])
        with pytest.raises(SystemExit) as stop:
            experiments.main()
        assert stop.value.code == 0 and option in "".join(capsys.readouterr())  # fire writes help to stderr off a tty


def test_a_rerun_appends_to_the_steps_log(tmp_path, monkeypatch) -> None:
    """The log of a killed or failed attempt stays above the rerun's, each under the command it ran."""
    from scripts import experiments

    def failing(cmd, stdout, **kwargs) -> int:
        stdout.write("Traceback: killed\n")
        return 1

    monkeypatch.setattr(experiments.subprocess, "call", failing)
    log = str(tmp_path / "logs" / "step.log")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="training failed"):
            experiments.bundle("training", ["configs/demo.yaml"], {"seed": 0}, log, in_process=False)
    text = open(log).read()
    assert text.count("=== ") == 2 and text.count("monai.bundle run training") == 2
    assert text.count("Traceback: killed") == 2


def test_compare_puts_evaluations_of_one_test_set_side_by_side(tmp_path, capsys) -> None:
    data = {"datalist": str(tmp_path / "list.json"), "dataset_dir": str(tmp_path), "label_threshold": 0.0}
    common = {"data": data, "data_section": "test", "n_images": 4, "best_dice": 0.2, "pixel_auroc": 0.9}
    for name, method, aupro, image_auroc in (("iltm", "iltm", 0.7, None), ("nsa", "nsa", 0.612, 0.75)):
        (tmp_path / name).mkdir()
        result = {**common, "method": method, "checkpoint": f"runs/{name}/model.pt", "aupro": aupro,
                  "image_auroc": image_auroc}  # fmt: skip
        (tmp_path / name / "metrics.json").write_text(json.dumps(result))
    table = experiments_report.compare(str(tmp_path / "iltm"), str(tmp_path / "nsa" / "metrics.json"),
                                       out=str(tmp_path / "table.md"))  # fmt: skip
    assert f"| {tmp_path / 'nsa' / 'metrics.json'} | nsa | runs/nsa/model.pt | 61.2 | 20.0 | 90.0 | 75.0 | 4 |" in table
    assert "| iltm | runs/iltm/model.pt | 70.0 | 20.0 | 90.0 | - | 4 |" in table  # undefined: "-"
    assert (tmp_path / "table.md").read_text() == table + "\n" and "section 'test' of" in capsys.readouterr().out
    other = json.loads((tmp_path / "nsa" / "metrics.json").read_text())
    (tmp_path / "nsa" / "metrics.json").write_text(json.dumps({**other, "data_section": "validation"}))
    with pytest.raises(ValueError, match="scored different labels") as err:
        experiments_report.compare(str(tmp_path / "iltm"), str(tmp_path / "nsa"))
    assert "section 'validation', 4 images" in str(err.value)
    (tmp_path / "nsa" / "metrics.json").write_text(json.dumps({k: v for k, v in other.items() if k != "data"}))
    older = experiments_report.compare(str(tmp_path / "iltm"), str(tmp_path / "nsa"))  # evaluated before 0.7.4
    assert f"Not recorded which labels {tmp_path / 'nsa'} scored: check that it is the same test set." in older
    assert older.endswith("no per-image AUPRO to pair (aupro_raw.csv, written since 0.7.6).")
    own = {"iltm": [0.5, 0.6, 0.7, 0.8, 0.9, 0.4, 0.3, "nan"], "nsa": [0.4, 0.5, 0.6, 0.7, 0.8, 0.3, 0.3, 0.9]}
    for name, values in own.items():  # MONAI's MetricsSaver layout; the last image of the first has no anomaly
        rows = "".join(f"images/{i},{v},{v}\n" for i, v in enumerate(values))
        (tmp_path / name / "aupro_raw.csv").write_text("filename,class0,mean\n" + rows)
    paired = experiments_report.compare(str(tmp_path / "iltm"), str(tmp_path / "nsa"))
    assert paired.endswith(
        f"{tmp_path / 'nsa'} against {tmp_path / 'iltm'}, image by image (own AUPRO, 7 images with "
        "anomalies): higher on 0, lower on 6: beyond chance (two-sided sign test, p = 0.0312)."
    )
    reverse = experiments_report.compare(str(tmp_path / "nsa"), str(tmp_path / "iltm"))
    assert reverse.endswith("higher on 6, lower on 0: beyond chance (two-sided sign test, p = 0.0312).")
    with pytest.raises(ValueError, match="the same evaluation as .*iltm, given twice"):
        experiments_report.compare(str(tmp_path / "iltm"), str(tmp_path / "iltm" / "metrics.json"))
    with pytest.raises(FileNotFoundError, match="nowhere: no metrics.json there"):
        experiments_report.compare(str(tmp_path / "nowhere"))


def test_a_gain_that_rounds_to_zero_reads_as_zero() -> None:
    """A new user's sweep table showed "-0.0" for a mean gain of a few thousandths below zero."""
    assert experiments_report._cell((-0.0001, 0.01, 2), sign=True) == "+0.0 ± 1.0"
    assert experiments_report._cell((-0.0004, float("nan"), 1), seeds=2) == "0.0 (n=1)"
    assert experiments_report._cell((-0.0123, 0.02, 2), sign=True) == "-1.2 ± 2.0"
