"""MLflow tracking of what MONAI's ``--tracking mlflow`` cannot see: the Transformer iterations and the ILTM table.

``python -m monai.bundle run training ... --tracking mlflow`` adds MONAI's ``MLFlowHandler`` to the standard engines,
here the VQ-VAE's trainer and evaluator (``train#handlers``, ``validate#handlers``). The Transformer is trained once
per ILTM iteration by engines built per iteration from the config's factories (scripts/transformer_stage.py), so they
get their own MLFlowHandlers,
one MLflow run per iteration (``transformer_KK``) in the same experiment and store, and the ILTM workflow logs its
per-iteration table (``iltm/summary.csv``) as one more run (``iltm``) with the summary and plots as artifacts.
mlflow is imported only when tracking is on; it is not needed otherwise.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from monai.utils import path_to_uri

logger = logging.getLogger(__name__)


def settings(handlers: Iterable[Any], tracking_uri: str, experiment_name: str) -> dict | None:
    """Tracking settings when MONAI's `--tracking` put an MLFlowHandler among `handlers`, else None (tracking off)."""
    if not any(type(h).__name__ == "MLFlowHandler" for h in handlers):
        return None
    return {"tracking_uri": tracking_uri, "experiment_name": experiment_name}


def check_server(tracking_uri: str, timeout: float = 5.0) -> None:
    """An http(s) store whose server does not answer stops the run before any work, rather than after minutes of
    MLflow's retries in the middle of training (a local SQLite or file store needs no check)."""
    parts = urllib.parse.urlsplit(str(tracking_uri))
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(
            f"--tracking_uri {tracking_uri}: no server answers at {parts.hostname}:{port} ({e}); start the MLflow "
            "server, or leave --tracking_uri out to track into a SQLite store in the output folder"
        ) from None


def engine_handlers(
    tracking: Mapping[str, str] | None, run_name: str, epoch: Callable[[Any], int]
) -> tuple[Any, Any] | None:
    """(trainer handler, evaluator handler) logging into one MLflow run `run_name`, validation metrics at the
    trainer's epoch (`epoch`); None when tracking is off. The caller closes them when training ends."""
    if not tracking:
        return None
    from monai.handlers import MLFlowHandler

    common = dict(tracking_uri=tracking["tracking_uri"], experiment_name=tracking["experiment_name"], run_name=run_name)
    trainer = MLFlowHandler(**common, tag_name="train_loss", output_transform=lambda out: out["loss"])
    return trainer, MLFlowHandler(**common, iteration_log=False, global_epoch_transform=epoch)


def log_table(
    tracking: Mapping[str, str] | None, folder: str, params: Mapping[str, Any], run_name: str = "iltm"
) -> None:
    """One MLflow run with every numeric column of `folder/summary.csv` per ILTM iteration (the step), `params`, and
    the summary and plots of `folder` as artifacts."""
    if not tracking:
        return
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking["tracking_uri"])
    experiment = client.get_experiment_by_name(tracking["experiment_name"])
    if experiment is None:
        uri = tracking["tracking_uri"]
        location = None  # as MONAI's MLFlowHandler: artifacts of a SQLite store go to `mlruns` beside the database
        if uri.startswith("sqlite:///"):
            location = path_to_uri(os.path.join(os.path.dirname(uri[len("sqlite:///") :]), "mlruns"))
        experiment_id = client.create_experiment(tracking["experiment_name"], artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=run_name)
    try:
        with open(os.path.join(folder, "summary.csv")) as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            for name, value in _numbers(row):
                client.log_metric(run.info.run_id, name, value, step=int(row["iteration"]))
        for name, value in params.items():
            client.log_param(run.info.run_id, name, value)
        for name in ("summary.md", "summary.csv", "progress.png", "mask_panel.png"):
            if os.path.isfile(os.path.join(folder, name)):
                client.log_artifact(run.info.run_id, os.path.join(folder, name))
    finally:
        client.set_terminated(run.info.run_id)


def _numbers(row: Mapping[str, str], skip: Sequence[str] = ("iteration",)) -> list[tuple[str, float]]:
    out = []
    for name, text in row.items():
        try:
            value = float(text)
        except (TypeError, ValueError):
            continue
        if name not in skip and not math.isnan(value):
            out.append((name, value))
    return out


def log_run_params(engine: Any, params: Mapping[str, Any]) -> None:
    """`params` on the MLflow run of each MONAI ``MLFlowHandler`` attached to `engine` (``--tracking mlflow``), which
    logs only ignite's own state (``max_epochs``, ...): an evaluation's run then records which checkpoint and
    settings made its metrics. Nothing happens when tracking is off."""
    owners = {id(o): o for handlers in getattr(engine, "_event_handlers", {}).values() for fn, *_ in handlers
              if type(o := getattr(fn, "__self__", None)).__name__ == "MLFlowHandler"}  # fmt: skip
    for handler in owners.values():
        run = getattr(handler, "cur_run", None)
        if not run:
            continue
        new = {k.replace("#", "/"): str(v) for k, v in params.items()}  # MLflow refuses '#' in names
        try:  # a killed evaluation's run, reused by MONAI under the same name, cannot take other values
            logged = handler.client.get_run(run.info.run_id).data.params
            handler._log_params({k: v for k, v in new.items() if logged.get(k) != v})
        except Exception as e:  # noqa: BLE001 - tracking must not cost the metrics, which are written already
            logger.warning(f"MLflow run {run.info.run_name!r}: the evaluation's settings were not logged ({e})")
