"""torchrun on CPU (gloo, 2 processes): both stages and an ILTM iteration train, the run looks as a single process's,
the masks are a single process's, a killed rank's run resumes, and evaluation gives a single process's metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny import TINY_DETECTOR

from scripts.checkpoint import load_detector
from scripts.steps import RunState
from scripts.tokens import load_token_masks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["configs/train.yaml", "configs/demo.yaml"]
SETTINGS = {
    **TINY_DETECTOR,
    "synthetic#n_train": 12, "synthetic#n_val": 4, "synthetic#n_test": 4, "synthetic#image_size": 32,
    "vqvae#epochs": 2, "vqvae#val_interval": 1, "vqvae#batch_size": 4, "transformer#epochs": 2,
    "transformer#val_interval": 1, "transformer#batch_size": 4, "iltm#max_iterations": 1, "iltm#min_iterations": 1,
    "iltm#mask_num_samples": 2, "iltm#mask_num_decodes": 2, "iltm#mask_batch_size": 2,
    "iltm#mask_resample_threshold": 0.2,  # a barely trained Transformer flags nothing at the paper's 0.005
    "iltm#downsample_rule": "fraction",  # with these, about half the tokens: masks that could differ
    "iltm#mask_density_threshold": 1e-7,
}  # fmt: skip


def bundle(run_id: str, configs: list[str], processes: int, env: dict | None = None, **overrides) -> str:
    """`python -m monai.bundle run` as a user types it, under torchrun when `processes` > 1 (one thread each)."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    args = [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    cmd = [*launcher, "-m", "monai.bundle", "run", run_id, "--config_file", repr(configs), *args]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    result = subprocess.run(cmd, cwd=ROOT, env={**environ, **(env or {})}, capture_output=True, text=True, timeout=240)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def files(folder) -> list[str]:
    """A run's files, with the names that carry a process id or an iteration count made generic."""
    names = []
    for base, _, found in os.walk(folder):
        for name in found:
            name = "events" if name.startswith("events.out.tfevents") else name
            name = "checkpoint_N.pt" if name.startswith("checkpoint_") else name
            names.append(os.path.relpath(os.path.join(base, name), folder))
    return sorted(names)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """The same tiny training with 2 processes and with one."""
    tmp = tmp_path_factory.mktemp("ddp")
    common = {**SETTINGS, "dataset_dir": str(tmp / "data")}
    out = {}
    for name, processes, configs in (("ddp", 2, [*TRAIN, "configs/multi_gpu_train.yaml"]), ("single", 1, TRAIN)):
        out[name] = str(tmp / name)
        out[f"{name}_log"] = bundle(
            "training", configs, processes, output_dir=out[name], **{"iltm#export": str(tmp / f"{name}.pt")}, **common
        )
    out["data"] = str(tmp / "data")
    return out


def test_two_processes_train_everything_into_the_layout_of_one(runs) -> None:
    assert files(runs["ddp"]) == files(runs["single"])
    steps = RunState(runs["ddp"]).steps
    assert {"vqvae", "transformer_00", "masks_01", "transformer_01", "checks_01"} <= set(steps)
    assert steps["masks_01"]["total_tokens"] == 12 * 8 * 8  # every training image once, none twice
    assert not os.path.exists(os.path.join(runs["ddp"], "iltm", "iter_01", "mask_chunks"))
    # the log is rank 0's, as one process's: rank 1 logged each epoch too (a user's pass)
    epochs = [
        log.count("SupervisedTrainer - INFO - Epoch[1] Complete") for log in (runs["ddp_log"], runs["single_log"])
    ]
    assert epochs[0] == epochs[1] > 0


def test_sharded_masks_are_a_single_process_pass(runs, load_preset) -> None:
    """The masks two ranks wrote equal one process's mask pass with the same detector (iteration 0)."""
    parser, _ = load_preset("demo.yaml", **SETTINGS, output_dir=runs["ddp"], dataset_dir=runs["data"], tracking=None)
    workflow = parser.get_parsed_content("iltm#workflow")
    load_detector(workflow.detector, os.path.join(runs["ddp"], "iltm", "iter_00", "model.pt"))
    suspect, _ = workflow._mask_pass(workflow.train_files, workflow.thresholds[0], "single process")
    written = load_token_masks(
        os.path.join(runs["ddp"], "iltm", "iter_01", "token_masks.pt"), workflow.train_files, workflow.grid
    )
    assert suspect.shape == written.shape and torch.equal(suspect, written)
    assert 0 < int(written.sum()) < written.numel()  # masks that could differ


def test_a_killed_rank_resumes_from_the_same_command(tmp_path) -> None:
    kill = {"transformer#handlers": [{"_target_": "ddp_helpers.KillRank", "_mode_": "callable"}]}
    args = {**SETTINGS, **kill, "dataset_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "run"),
            "iltm#export": str(tmp_path / "model.pt")}  # fmt: skip
    configs = [*TRAIN, "configs/multi_gpu_train.yaml"]
    with pytest.raises(RuntimeError, match="failed"):
        bundle("training", configs, 2, env={"ILTM_TEST_KILL": "1"}, **args)
    before = RunState(str(tmp_path / "run")).steps
    assert "vqvae" in before and "transformer_00" not in before
    assert any(n.startswith("checkpoint_") for n in os.listdir(tmp_path / "run" / "iltm" / "iter_00"))
    bundle("training", configs, 2, **args)
    after = RunState(str(tmp_path / "run")).steps
    assert after["vqvae"] == before["vqvae"]  # not trained again
    assert {"transformer_00", "masks_01", "transformer_01"} <= set(after) and os.path.isfile(tmp_path / "model.pt")


def test_evaluation_with_two_processes_gives_the_metrics_of_one(runs, tmp_path) -> None:
    results = {}
    for name, processes, extra in (("ddp", 2, ["configs/multi_gpu_evaluate.yaml"]), ("single", 1, [])):
        configs = ["configs/inference.yaml", "configs/evaluate.yaml", *extra]
        out = str(tmp_path / name)
        bundle("evaluating", configs, processes, checkpoint=os.path.join(runs["ddp"], "model.pt"),
               dataset_dir=runs["data"], output_dir=out)  # fmt: skip
        with open(os.path.join(out, "metrics.json")) as f:
            results[name] = json.load(f)
        with open(os.path.join(out, "image_score_raw.csv")) as f:
            results[name + "_rows"] = sorted(f.read().splitlines())
        results[name + "_files"] = files(out)
    assert results["ddp"] == results["single"] and results["ddp"]["n_images"] == 4
    assert results["ddp_rows"] == results["single_rows"] and results["ddp_files"] == results["single_files"]


def test_torchrun_that_would_not_be_one_run_stops_before_any_work(runs, tmp_path) -> None:
    """Without the overlay each process would train (or map) everything into the same folder; a baseline would be
    trained whole by every rank. Each stops with what to do instead, and leaves no run behind."""
    common = {**SETTINGS, "dataset_dir": runs["data"]}
    with pytest.raises(RuntimeError, match="did not join into one run: layer configs/multi_gpu_train.yaml last"):
        bundle("training", TRAIN, 2, output_dir=str(tmp_path / "plain"), **common)
    baseline = [*TRAIN, "configs/baseline_dense.yaml", "configs/multi_gpu_train.yaml"]
    with pytest.raises(RuntimeError, match="configs/baseline_dense.yaml trains in one process, and torchrun started 2"):
        bundle("train_baseline", baseline, 2, output_dir=str(tmp_path / "dense"), **common)
    with pytest.raises(RuntimeError, match="did not join into one run: layer configs/multi_gpu_evaluate.yaml last"):
        bundle("evaluating", ["configs/inference.yaml", "configs/evaluate.yaml"], 2,
               checkpoint=os.path.join(runs["ddp"], "model.pt"), dataset_dir=runs["data"],
               output_dir=str(tmp_path / "eval"))  # fmt: skip
    for name in ("plain", "dense", "eval"):
        assert not os.path.exists(tmp_path / name) or not os.listdir(tmp_path / name), name


def _alive(pid: int) -> bool:
    """Running, not a zombie left for a reaper."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_torchrun_takes_its_ranks_with_it(tmp_path) -> None:
    """torchrun starts its ranks in sessions of their own: a SIGKILL to torchrun alone (`timeout -s KILL`) left them
    training on into the run's folder, or hanging (a user's pass). Each rank now dies with it."""
    script = tmp_path / "join.py"
    script.write_text("import os, pathlib, time\nfrom scripts import distributed\ndistributed.initialise()\n"
                      "pathlib.Path(__file__).with_name(f'rank{distributed.rank()}').write_text(str(os.getpid()))\n"
                      "time.sleep(300)\n")  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        deadline = time.time() + 120
        while len(pids) < 2 and time.time() < deadline and launcher.poll() is None:  # each rank writes its pid
            time.sleep(0.2)
            pids = [int(f.read_text()) for f in sorted(tmp_path.glob("rank[01]")) if f.read_text()]
        assert len(pids) == 2 and all(map(_alive, pids))
        launcher.kill()
        launcher.wait()
        deadline = time.time() + 30
        while any(map(_alive, pids)) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(map(_alive, pids))
    finally:
        launcher.kill()
        for pid in filter(_alive, pids):
            os.kill(pid, signal.SIGKILL)
