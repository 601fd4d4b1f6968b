"""Resumable steps of a run (`state.json`): a finished step is never redone or overwritten, a killed one resumes."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import time
from typing import Any

import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.data.utils import set_rnd
from monai.handlers import CheckpointLoader

from scripts import distributed
from scripts.checkpoint import CheckpointError, load_checkpoint, load_weights, state_dict
from scripts.files import atomic_save, write_json

logger = logging.getLogger(__name__)


def _checkpoints(folder: str, pattern: str = "checkpoint_*.pt") -> list[str]:
    """Resume checkpoints in `folder`, oldest first (by the iteration in the name, then the time written)."""

    def order(path: str) -> tuple[int, float]:
        digits = re.findall(r"\d+", os.path.basename(path))
        return int(digits[-1]) if digits else -1, os.path.getmtime(path)

    return sorted(glob.glob(os.path.join(folder, pattern)), key=order)


def latest_checkpoint(folder: str, pattern: str = "checkpoint_*.pt") -> str | None:
    """The newest resumable checkpoint in `folder`, if a killed run left one."""
    paths = _checkpoints(folder, pattern)
    return paths[-1] if paths else None


def _keep_latest(folder: str, keep: int = 1) -> None:
    """Keeps the `keep` newest resume checkpoints and removes the rest, with the temporaries a killed save left.

    Called after each save: ignite's own pruning (`n_saved`) removes the checkpoint it replaces before writing the
    new one, so a kill during that write would leave nothing to resume from.
    """
    for path in _checkpoints(folder)[:-keep]:
        os.remove(path)
    for path in glob.glob(os.path.join(folder, "tmp*")):  # DiskSaver's atomic temporaries: `tmp` + 8 characters
        if re.fullmatch(r"tmp[a-z0-9_]{8}", os.path.basename(path)) and os.path.isfile(path):
            os.remove(path)


class RecordError(RuntimeError):
    """A run's bookkeeping file (state.json, run.json) that cannot be read."""


def read_record(path: str, holds: str) -> dict:
    """A JSON object a run keeps (`holds` says what it records); unreadable ones stop with the path and what to do."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(
            f"{path}: unreadable ({e.__class__.__name__}: {e}). It records {holds}; restore it from a backup, or "
            "start a new run with a new --output_dir (or --overwrite True to move this one aside)."
        ) from None
    if not isinstance(record, dict):
        raise RecordError(f"{path}: not a JSON object as this bundle writes; use a new --output_dir")
    return record


class RunState:
    """`state.json` under the output folder: one record per completed step, written atomically.

    Read from disk on every access, so that several holders (the ILTM loop, each training stage) never write back a
    stale copy over each other's steps.
    """

    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, "state.json")

    @property
    def steps(self) -> dict[str, dict]:
        if not os.path.isfile(self.path):
            return {}
        return read_record(self.path, "which steps of this run are complete")

    def done(self, step: str) -> bool:
        return step in self.steps

    def complete(self, step: str, **info: Any) -> None:
        steps = self.steps
        if step in steps:
            raise RuntimeError(f"{self.path}: step {step!r} is already complete and will not be overwritten")
        steps[step] = {"completed_at": time.strftime("%Y-%m-%d %H:%M:%S"), **info}
        write_json(self.path, steps)  # an unmeasured metric (NaN) as null, which strict JSON readers accept


def _reseed(engine, seed: int) -> None:
    """torch's RNG and the random transforms of the epoch's data (MONAI's own random states) from (seed, epoch)."""
    torch.manual_seed(seed)
    set_rnd(getattr(engine.data_loader, "dataset", None), seed)


def _validate_last(trainer, evaluator) -> None:
    """The record holds the final weights' validation metrics, also when `val_interval` skips the last epoch."""
    if trainer.state.epoch == trainer.state.max_epochs and evaluator.state.epoch != trainer.state.epoch:
        evaluator.run(trainer.state.epoch)


class BestWeights:
    """Keeps the weights of the best validation so far on disk (`path`), so a stage can end with them.

    A network that goes on training after its validation score peaks fits its own training images better than
    unseen ones; for the Transformer that means ILTM's masks, computed on those very images, stop catching what it
    memorised (docs/README.md, "Which epoch's Transformer"). The file survives a kill, so a resumed run compares
    against the best epoch of the whole run. Ties go to the later epoch.
    """

    def __init__(self, path: str, metric: str) -> None:
        self.path, self.metric = path, metric
        kept = self.best()  # read once: a resumed run's best so far
        self.score = kept["metrics"][metric] if kept is not None else float("-inf")

    def best(self) -> dict | None:
        return load_checkpoint(self.path) if os.path.isfile(self.path) else None

    def update(self, epoch: int, metrics: dict, network: torch.nn.Module) -> None:
        score = float(metrics.get(self.metric, float("nan")))
        if score >= self.score:  # False for NaN
            metrics = {k: float(v) for k, v in metrics.items()}
            atomic_save({"epoch": epoch, "metrics": metrics, "model": network.state_dict()}, self.path)
            self.score = score


def _epoch(trainer_state: dict) -> int | None:
    """The epoch an ignite trainer's saved state ends (it saves the iteration and the epoch length)."""
    if "epoch" in trainer_state:
        return int(trainer_state["epoch"])
    iteration, length = trainer_state.get("iteration"), trainer_state.get("epoch_length")
    return int(iteration) // int(length) if iteration is not None and length else None


def _reraise_interrupt(_engine, error: BaseException) -> None:
    if isinstance(error, KeyboardInterrupt):
        raise error


def quiet_interrupt(*engines) -> None:
    """Ctrl-C ends a run with the bundle's one-line way on (scripts/__init__.py) instead of MONAI's StatsHandler
    logging it with a traceback: ignite stops at the first EXCEPTION_RAISED handler that raises, so this one goes
    first. Other errors go on to the handlers as before; an engine without any is left alone (ignite raises then)."""
    for engine in engines:
        handlers = getattr(engine, "_event_handlers", {}).get(Events.EXCEPTION_RAISED)
        if handlers and handlers[0][0] is not _reraise_interrupt:
            engine.add_event_handler(Events.EXCEPTION_RAISED, _reraise_interrupt)
            handlers.insert(0, handlers.pop())


def train_stage(
    step: str, trainer, weights: str, output_dir: str, evaluator=None, seed: int = 0, best_metric: str | None = None
) -> torch.nn.Module:
    """Runs `trainer` unless `step` is complete; either way its network ends with the stage's final weights.

    Every epoch the network, optimiser and trainer state go to a checkpoint beside `weights`; a rerun of the same
    command after a kill resumes from it. Only when training ends are the final weights written and the step, with
    `evaluator`'s validation metrics of the final weights, recorded in `state.json`; a completed step is never rerun.
    With `best_metric` (higher is better) the final weights are those of the best validated epoch (:class:`BestWeights`),
    recorded as `best_epoch` with that epoch's metrics.
    The global RNG and the data's random transforms are re-seeded from (seed, epoch) at every epoch start, so
    shuffling, dropout and augmentation after a resume are those of an uninterrupted run. Under torchrun every rank
    trains and resumes from the same checkpoint; only rank 0 writes (scripts/distributed.py), and every rank returns
    after the step is recorded.
    """
    network, state = distributed.unwrap(trainer.network), RunState(output_dir)
    if state.done(step):
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{weights}: step {step!r} is complete in {state.path} but its weights are gone")
        logger.info(f"{step}: already complete, loading {weights}")
        load_weights(network, state_dict(load_checkpoint(weights)), weights)
        return network
    quiet_interrupt(trainer, evaluator)
    folder = os.path.dirname(weights)
    objects = {"model": network, "optimizer": trainer.optimizer, "trainer": trainer}
    if trainer.scaler is not None:
        objects["scaler"] = trainer.scaler
    resume, resumed = latest_checkpoint(folder), {}
    if resume is not None:
        try:
            epoch = _epoch(load_checkpoint(resume).get("trainer", {}))
        except CheckpointError as e:
            raise CheckpointError(f"{e}\nDelete it to train step {step!r} from its first epoch.") from None
        resumed = {"resumed_after_epoch": epoch}  # the step's wall time is then that of its last segment
        logger.info(f"{step}: resuming after epoch {epoch} of {trainer.state.max_epochs}, from {resume}")
        CheckpointLoader(load_path=resume, load_dict=objects, map_location="cpu").attach(trainer)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: _reseed(engine, seed * 100_003 + engine.state.epoch))
    if evaluator is not None:  # the last epoch is validated while the run is open (MLflow closes it on COMPLETED)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: _validate_last(engine, evaluator))
    keeper = BestWeights(os.path.join(folder, "best.pt"), best_metric) if best_metric and evaluator else None
    if keeper is not None:
        evaluator.add_event_handler(
            Events.EPOCH_COMPLETED, lambda engine: keeper.update(trainer.state.epoch, engine.state.metrics, network)
        )
    if distributed.is_main():
        saver = Checkpoint(objects, DiskSaver(folder, require_empty=False), n_saved=None)  # checkpoint_N.pt
        trainer.add_event_handler(Events.EPOCH_COMPLETED, saver)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: _keep_latest(folder))
    start = time.time()
    trainer.run()
    if evaluator is not None:  # a resume that found no epoch left to train
        _validate_last(trainer, evaluator)
    if distributed.is_main():
        best = keeper.best() if keeper is not None else None
        metrics = {k: float(v) for k, v in (evaluator.state.metrics if evaluator is not None else {}).items()}
        if best is not None:
            network.load_state_dict(best["model"])
            metrics = {**best["metrics"], "best_epoch": best["epoch"]}
            logger.info(f"{step}: keeping epoch {best['epoch']} of {trainer.state.max_epochs}, the best {best_metric}")
        else:  # no best metric (the VQ-VAE): the validation metrics recorded below are this epoch's
            logger.info(f"{step}: keeping its last epoch, {trainer.state.epoch} of {trainer.state.max_epochs}")
        atomic_save(network.state_dict(), weights)
        state.complete(
            step,
            weights=os.path.relpath(weights, output_dir),
            wall_time_s=round(time.time() - start, 1),
            **resumed,
            **metrics,
        )
        if keeper is not None and os.path.isfile(keeper.path):  # now a copy of `weights`
            os.remove(keeper.path)
    distributed.barrier()  # every rank is past its resume (which may read the checkpoint) before it goes
    if distributed.is_main():
        for path in _checkpoints(folder):  # resume state (model, optimiser, trainer) the completed step no longer needs
            os.remove(path)
    if best_metric and distributed.active():  # every rank goes on (ILTM's mask passes) with the kept weights
        network.load_state_dict(state_dict(load_checkpoint(weights)))
    return network
