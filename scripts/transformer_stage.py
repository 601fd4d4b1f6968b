"""Training one masked Transformer on cached token sequences with MONAI's ignite engines.

ILTM trains a Transformer many times (iteration 0 and once per ILTM iteration, from scratch by default), each time
with other token masks, so the engines are built per call here rather than once in the config; the hyperparameters
still come from the config (`transformer` section of configs/train.yaml).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from ignite.engine import Events
from ignite.handlers import ProgressBar
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import StatsHandler, TensorBoardStatsHandler, ValidationHandler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from scripts import tracking
from scripts.healing import token_log_likelihood
from scripts.stages import train_stage
from scripts.transformer import autocast, sequence_loss


def _autocast(engine):
    return autocast(engine.state.device, engine.amp)


def train_step(engine: SupervisedTrainer, batch) -> dict:
    """One optimiser step on (sequence, keep): masked tokens leave attention and the loss (scripts.transformer)."""
    seq, keep = (t.to(engine.state.device) for t in batch)
    engine.network.train()
    engine.optimizer.zero_grad(set_to_none=True)
    with _autocast(engine):
        loss = engine.loss_function(engine.network, seq, keep)  # scripts.transformer.sequence_loss
    if engine.amp and engine.scaler is not None:
        engine.scaler.scale(loss).backward()
        engine.scaler.step(engine.optimizer)
        engine.scaler.update()
    else:
        loss.backward()
        engine.optimizer.step()
    return {"loss": loss.detach()}


@torch.no_grad()
def val_step(engine: SupervisedEvaluator, batch) -> dict:
    """Summed token log-likelihood of a batch of (unmasked) validation sequences."""
    seq = batch[0].to(engine.state.device)
    engine.network.eval()
    with _autocast(engine):
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

    Args:
        epochs, batch_size, lr, weight_decay: AdamW training settings.
        val_interval: epochs between validations (the last epoch is always validated).
        device, amp: where to train; AMP only on CUDA.
        tracking: MLflow settings (scripts/tracking.py) when `--tracking mlflow` is on: one run per call.
    """

    def __init__(
        self,
        epochs: int = 50,
        batch_size: int = 16,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        val_interval: int = 5,
        device: str | torch.device = "cpu",
        amp: bool = False,
        seed: int = 0,
        tracking: Mapping[str, str] | None = None,
    ) -> None:
        self.tracking = tracking
        self.epochs, self.batch_size, self.lr, self.weight_decay = epochs, batch_size, lr, weight_decay
        self.val_interval, self.device, self.amp, self.seed = val_interval, torch.device(device), amp, seed

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
        network = network.to(self.device)
        train_loader = DataLoader(TensorDataset(train_seq, train_keep), batch_size=self.batch_size, shuffle=True)
        val_loader = DataLoader(TensorDataset(val_seq), batch_size=self.batch_size, shuffle=False)
        optimizer = torch.optim.AdamW(network.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        board = os.path.join(folder, "tensorboard")
        evaluator = SupervisedEvaluator(
            device=self.device,
            val_data_loader=val_loader,
            network=network,
            iteration_update=val_step,
            amp=self.amp,
            decollate=False,
            val_handlers=[
                MeanLogLikelihood(),
                StatsHandler(name=f"{step}.val", iteration_log=False),
                TensorBoardStatsHandler(log_dir=board, iteration_log=False),
            ],
        )
        loss = lambda output: output["loss"]  # noqa: E731 - decollate=False: the output is one dict
        trainer = SupervisedTrainer(
            device=self.device,
            max_epochs=self.epochs,
            train_data_loader=train_loader,
            network=network,
            optimizer=optimizer,
            loss_function=sequence_loss,
            iteration_update=train_step,
            amp=self.amp,
            decollate=False,
            train_handlers=[
                ValidationHandler(validator=evaluator, interval=self.val_interval, epoch_level=True),
                StatsHandler(name=f"{step}.train", tag_name="train_loss", output_transform=loss, iteration_log=False),
                TensorBoardStatsHandler(log_dir=board, tag_name="train_loss", output_transform=loss),
            ],
        )
        ProgressBar(persist=False, desc=step).attach(trainer, output_transform=lambda out: {"loss": float(out["loss"])})
        if self.epochs % self.val_interval:
            trainer.add_event_handler(Events.COMPLETED, lambda _: evaluator.run())
        tracked = tracking.engine_handlers(self.tracking, step, lambda _: trainer.state.epoch)
        if tracked:
            tracked[0].attach(trainer)
            tracked[1].attach(evaluator)
        try:
            return train_stage(step, trainer, os.path.join(folder, "transformer.pt"), output_dir, evaluator, self.seed)
        finally:
            for handler in tracked or ():
                handler.close()
