"""Training one masked Transformer on cached token sequences with MONAI's ignite engines.

ILTM trains a Transformer many times (iteration 0 and once per ILTM iteration, from scratch by default), each time
with other token masks, so the config gives factories of the engines, loaders and optimiser (`transformer` section of
configs/train.yaml) and :class:`TransformerStage` calls them per Transformer. The step's parts live here: batches of
(sequence, keep mask), the next-token inferer, the loss and the validation step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Events
from ignite.handlers import ProgressBar
from monai.data import DistributedSampler
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import StatsHandler, TensorBoardStatsHandler, ValidationHandler
from monai.inferers import Inferer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from scripts import distributed, tracking
from scripts.healing import token_log_likelihood
from scripts.steps import train_stage
from scripts.transformer import autocast, next_token_loss


def prepare_sequences(batch, device=None, non_blocking: bool = False, **kwargs):
    """(sequences [B, L+1], keep masks [B, L+1]) as both inputs and targets of MONAI's supervised step."""
    seq, keep = (t.to(device, non_blocking=non_blocking) for t in batch)
    return (seq, keep), (seq, keep)


class NextTokenInferer(Inferer):
    """Logits of every next token: inputs seq[:, :-1] with their keep flags (masked tokens leave attention)."""

    def __call__(self, inputs: tuple[torch.Tensor, torch.Tensor], network: nn.Module, *args, **kwargs) -> torch.Tensor:
        seq, keep = inputs
        return network(seq[:, :-1], keep[:, :-1])


def masked_next_token_loss(logits: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The next-token loss over kept targets only (masked tokens leave the loss), as MONAI's step calls a loss."""
    return next_token_loss(logits, *targets)


@torch.no_grad()
def val_step(engine: SupervisedEvaluator, batch) -> dict:
    """Summed token log-likelihood of a batch of (unmasked) validation sequences."""
    seq = batch[0].to(engine.state.device)
    engine.network.eval()
    with autocast(engine.state.device, engine.amp):
        log_likelihood = token_log_likelihood(engine.network, seq).float()
    return {"sum": log_likelihood.sum(), "count": log_likelihood.numel()}


class MeanLogLikelihood:
    """Handler: mean per-token log-likelihood on the validation set (`val_loglik`, higher is better)."""

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine) -> None:
        self.total, self.count = 0.0, 0

    def _update(self, engine) -> None:
        self.total += float(engine.state.output["sum"])
        self.count += int(engine.state.output["count"])

    def _complete(self, engine) -> None:
        engine.state.metrics["val_loglik"] = self.total / max(self.count, 1)


class TransformerStage:
    """Trains a given Transformer on [N, L+1] sequences with [N, L+1] keep masks; resumable, never overwriting.

    ILTM trains a Transformer per iteration, so every engine part that must be new each time is a factory from the
    config (`transformer` section of configs/train.yaml, MONAI's `_mode_: callable`); this class only connects them
    and adds the handlers every Transformer gets (validation, logs, TensorBoard, progress bar, MLflow).

    Args:
        trainer: (train_data_loader, network, optimizer, train_handlers) -> SupervisedTrainer.
        evaluator: (val_data_loader, network, val_handlers) -> SupervisedEvaluator; its device is the training's.
        optimizer: parameters -> optimiser.
        train_loader, val_loader: dataset -> DataLoader.
        val_interval: epochs between validations (the last epoch is always validated).
        train_handlers, val_handlers: factories of extra handlers, each called once per Transformer trained.
        tracking: MLflow settings (scripts/tracking.py) when `--tracking mlflow` is on: one run per call.
    """

    def __init__(
        self,
        trainer: Callable[..., SupervisedTrainer],
        evaluator: Callable[..., SupervisedEvaluator],
        optimizer: Callable[..., torch.optim.Optimizer],
        train_loader: Callable[..., DataLoader],
        val_loader: Callable[..., DataLoader],
        val_interval: int = 5,
        train_handlers: Sequence[Callable[[], Any]] = (),
        val_handlers: Sequence[Callable[[], Any]] = (),
        seed: int = 0,
        tracking: Mapping[str, str] | None = None,
    ) -> None:
        self.trainer, self.evaluator, self.optimizer = trainer, evaluator, optimizer
        self.train_loader, self.val_loader, self.val_interval = train_loader, val_loader, val_interval
        self.train_handlers, self.val_handlers = list(train_handlers), list(val_handlers)
        self.seed, self.tracking = seed, tracking

    def _train_loader(self, dataset: TensorDataset) -> DataLoader:
        """The config's loader; under torchrun each rank draws its shard through MONAI's DistributedSampler."""
        if not distributed.active():
            return self.train_loader(dataset)
        return self.train_loader(dataset, sampler=DistributedSampler(dataset, shuffle=True), shuffle=False)

    def __call__(
        self,
        step: str,
        network: nn.Module,
        train_seq: torch.Tensor,
        train_keep: torch.Tensor,
        val_seq: torch.Tensor,
        folder: str,
        output_dir: str,
    ) -> nn.Module:
        """Trains `network` in place (or loads it, when `step` is already complete) and returns it."""
        board = os.path.join(folder, "tensorboard")
        main = distributed.is_main()  # under torchrun: rank 0 validates, logs and writes; every rank trains
        evaluator = self.evaluator(
            val_data_loader=self.val_loader(TensorDataset(val_seq)),
            network=network,
            val_handlers=[
                MeanLogLikelihood(),
                *(
                    [StatsHandler(name=f"{step}.val", iteration_log=False),
                     TensorBoardStatsHandler(log_dir=board, iteration_log=False)] if main else []
                ),  # fmt: skip
                *(make() for make in self.val_handlers),
            ],
        )
        network.to(evaluator.state.device)
        loss = lambda output: output["loss"]  # noqa: E731 - decollate=False: the output is one dict
        reporting = [
            ValidationHandler(validator=evaluator, interval=self.val_interval, epoch_level=True),
            StatsHandler(name=f"{step}.train", tag_name="train_loss", output_transform=loss, iteration_log=False),
            TensorBoardStatsHandler(log_dir=board, tag_name="train_loss", output_transform=loss),
        ] if main else []  # fmt: skip
        trainer = self.trainer(
            train_data_loader=self._train_loader(TensorDataset(train_seq, train_keep)),
            network=distributed.wrap(network, find_unused_parameters=True),  # the mask token may sit out a batch
            optimizer=self.optimizer(network.parameters()),
            train_handlers=[*reporting, *(make() for make in self.train_handlers)],
        )
        if main:
            ProgressBar(persist=False, desc=step).attach(
                trainer, output_transform=lambda out: {"loss": out["loss"].item()}
            )
        tracked = tracking.engine_handlers(self.tracking, step, lambda _: trainer.state.epoch) if main else None
        if tracked:
            tracked[0].attach(trainer)
            tracked[1].attach(evaluator)
        try:
            weights = os.path.join(folder, "transformer.pt")  # rank 0 validates (the last epoch too) and records
            best = "val_loglik" if len(val_seq) else None  # the epoch whose Transformer generalises best
            return train_stage(step, trainer, weights, output_dir, evaluator if main else None, self.seed, best)
        finally:
            for handler in tracked or ():
                handler.close()
