"""`--tracking mlflow`, MONAI's standard switch: the VQ-VAE, every Transformer iteration and the ILTM table end up in a
local SQLite MLflow store in output_dir, and so do evaluation metrics; no server."""

from __future__ import annotations

import os

import pytest
from monai.bundle import run

mlflow = pytest.importorskip("mlflow")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "synthetic#n_train": 8, "synthetic#n_val": 4, "synthetic#n_test": 4, "synthetic#image_size": 32,
    "image_size": [32, 32], "vqvae_def#channels": [16, 32], "vqvae_def#num_res_channels": [16, 32],
    "vqvae_def#num_embeddings": 32, "vqvae_def#embedding_dim": 8, "vqvae#batch_size": 4, "vqvae#epochs": 3,
    "vqvae#val_interval": 2, "transformer_def#embed_dim": 16, "transformer_def#num_layers": 1,
    "transformer_def#num_heads": 2, "transformer#epochs": 2, "transformer#val_interval": 1, "num_samples": 2,
    "num_decodes": 1, "iltm#mask_batch_size": 4, "iltm#mask_num_samples": 2, "iltm#mask_num_decodes": 1,
    "iltm#max_iterations": 1, "iltm#mask_resample_threshold": 0.1,  # so that this tiny Transformer flags and masks
}  # fmt: skip


def _runs(uri: str, experiment: str) -> dict:
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([found.experiment_id])}, client


def test_training_and_evaluation_are_tracked_locally(tmp_path, single_thread) -> None:
    out, data = str(tmp_path / "run"), str(tmp_path / "data")
    configs = [os.path.join(ROOT, "configs", f) for f in ("train.yaml", "demo.yaml")]
    common = {"bundle_root": ROOT, "dataset_dir": data, "output_dir": out, "iltm#export": os.path.join(out, "x.pt")}
    run("training", config_file=configs, tracking="mlflow", **common, **TINY)

    runs, client = _runs(f"sqlite:///{out}/mlruns.db", "iltm")
    assert set(runs) == {"vqvae", "transformer_00", "transformer_01", "iltm"}
    assert {"train_loss", "val_l1"} <= set(runs["vqvae"].data.metrics)
    history = client.get_metric_history(runs["vqvae"].info.run_id, "val_l1")
    assert [m.step for m in history] == [2, 3]  # val_interval 2 over 3 epochs: the last epoch too, in the same run
    for k in (0, 1):
        history = client.get_metric_history(runs[f"transformer_{k:02d}"].info.run_id, "val_loglik")
        assert [m.step for m in history] == [1, 2]  # at the trainer's epochs
        assert "train_loss" in runs[f"transformer_{k:02d}"].data.metrics
    table = runs["iltm"]
    steps = client.get_metric_history(table.info.run_id, "masked_tokens")
    assert [m.step for m in steps] == [0, 1] and table.data.params["final_iteration"] == "1"
    assert {"summary.csv", "summary.md", "progress.png"} <= {a.path for a in client.list_artifacts(table.info.run_id)}
    # a rerun of the finished run trains nothing and logs nothing again: no second table, no second copy of scalars
    run("training", config_file=configs, tracking="mlflow", **common, **TINY)
    again = client.search_runs([runs["iltm"].info.experiment_id])
    assert sorted(r.info.run_name for r in again) == sorted(runs)
    assert len(os.listdir(os.path.join(out, "iltm", "tensorboard"))) == 1

    evaluation = str(tmp_path / "eval")
    configs = [os.path.join(ROOT, "configs", f) for f in ("inference.yaml", "demo.yaml", "evaluate.yaml")]
    run(
        "evaluating", config_file=configs, tracking="mlflow", bundle_root=ROOT, dataset_dir=data, output_dir=evaluation,
        datalist=os.path.join(data, "datalist.json"), checkpoint=os.path.join(out, "model.pt"), save_maps=False,
        save_overlays=False,
        **{k: v for k, v in TINY.items() if not k.startswith(("synthetic", "vqvae#", "transformer#", "iltm"))},
    )  # fmt: skip
    logged, _ = _runs(f"sqlite:///{evaluation}/mlruns.db", "iltm")  # the bundle's experiment, not MONAI's default
    named = logged[
        f"evaluation of {os.path.join(out, 'model.pt')}"
    ]  # which checkpoint and settings made the metrics (a user's pass)
    assert {"aupro", "pixel_auroc", "image_auroc"} <= set(named.data.metrics)
    assert not {"num_samples", "flag_neighbourhood", "density_threshold"} & set(named.data.metrics)
    assert named.data.params["checkpoint"] == os.path.join(out, "model.pt") and named.data.params["resample"] == "True"
    assert named.data.params["data/label_threshold"] == "0.0" and named.data.params["num_samples"] == "2"


@pytest.mark.parametrize("command", ["training", "evaluating"])
def test_a_tracking_server_that_does_not_answer_stops_the_run_before_any_work(tmp_path, command) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    files = ("train.yaml", "demo.yaml") if command == "training" else ("inference.yaml", "demo.yaml", "evaluate.yaml")
    configs = [os.path.join(ROOT, "configs", f) for f in files]
    common = {"bundle_root": ROOT, "dataset_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out")}
    with pytest.raises(Exception) as err:
        run(command, config_file=configs, tracking="mlflow", tracking_uri=uri, **common, **TINY)
    cause = err.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, ConnectionError) and f"--tracking_uri {uri}: no server answers" in str(cause)
    assert not os.path.exists(tmp_path / "out" / "state.json")  # nothing trained
    assert not os.path.exists(tmp_path / "out" / "metrics.json") and not os.path.exists(tmp_path / "out" / "evaluation")
