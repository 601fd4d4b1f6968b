"""STKD, self-trained CutPaste with knowledge distillation (the paper's Table 1 baseline after Li et al.): CutPaste
trained in rounds on a training set it cleans itself, then distilled into a student.

Round 0 is CutPaste on every training image (:mod:`scripts.baselines.cutpaste`). After each round the current model
scores every training image (the maximum of its map) and the ``drop_fraction`` that look most anomalous are dropped
from the next round, which retrains from random weights on the rest. Finally a student of the same architecture is
trained to reproduce the last teacher's features on the kept images' patches (mean squared error), and the Gaussian
of the student's features over the kept images gives the map. Every round and the student are resumable steps of
``state.json`` (scripts/steps.py).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence

import torch
from monai.data import DataLoader, Dataset
from monai.transforms import RandSpatialCropd
from torch import nn

from scripts import distributed
from scripts.baselines.cutpaste import CutPasteNet, PatchGaussianDetector, fit_gaussian
from scripts.files import write_json
from scripts.inference import item_filename
from scripts.steps import train_stage
from scripts.vqvae import eval_except

logger = logging.getLogger(__name__)

__all__ = ["DistillBatch", "FeatureStudent", "check_layers", "keep_least_anomalous", "self_train"]


def check_layers(detector: nn.Module, method: str | None = None) -> None:
    """STKD's layer extends CutPaste's (its patches, augmentations and map) and must come after it: without CutPaste's,
    MONAI would stop at the first CutPaste setting STKD reads, naming only that config id; layered before it,
    CutPaste's layer replaces STKD's steps and the run would silently be CutPaste's (``method``, the evaluation
    record's, then says "cutpaste")."""
    order = ("'configs/baseline_cutpaste.yaml','configs/baseline_stkd.yaml'", "CutPaste's first")
    if not isinstance(detector, PatchGaussianDetector):
        raise ValueError(f"configs/baseline_stkd.yaml extends configs/baseline_cutpaste.yaml: layer both, {order[1]}, "
                         f"e.g. --config_file \"['configs/train.yaml','configs/demo.yaml',{order[0]}]\"")  # fmt: skip
    if method is not None and method != "stkd":
        raise ValueError(f"configs/baseline_cutpaste.yaml came after configs/baseline_stkd.yaml and replaced STKD's "
                         f"steps (this would be CutPaste's run): layer them as ...,{order[0]}")  # fmt: skip


def keep_least_anomalous(scores: Sequence[float], drop_fraction: float) -> list[int]:
    """Indices of the images to keep: all but the ``drop_fraction`` with the highest scores (at least one kept)."""
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}.")
    dropped = min(len(scores) - 1, math.floor(drop_fraction * len(scores)))
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    return sorted(order[: len(scores) - dropped])


class FeatureStudent(nn.Module):
    """The student: a CutPaste network whose forward gives its features, to be matched to the teacher's."""

    def __init__(self, network: CutPasteNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.features(x)


class DistillBatch:
    """`prepare_batch`: the patches and, as targets, the frozen teacher's features of them."""

    def __init__(self, teacher: CutPasteNet) -> None:
        self.teacher = teacher

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        images = torch.as_tensor(batchdata["image"]).float().to(device=device, non_blocking=non_blocking)
        with torch.no_grad(), eval_except(self.teacher):
            return images, self.teacher.features(images)


def self_train(
    detector: PatchGaussianDetector,
    make_network: Callable[[], CutPasteNet],
    make_trainer: Callable[..., object],
    make_optimizer: Callable[..., torch.optim.Optimizer],
    images: Sequence[dict],
    output_dir: str,
    rounds: int = 2,
    drop_fraction: float = 0.1,
    distill_epochs: int = 10,
    batch_size: int = 32,
    shrinkage: float = 0.01,
    seed: int = 0,
) -> PatchGaussianDetector:
    """Trains the rounds and the student, leaving the student and its Gaussian in ``detector``; returns it.

    ``make_trainer(network=..., optimizer=..., train_data_loader=...)`` builds a CutPaste trainer (the config's
    factory), ``make_trainer(..., loss_function=MSELoss, prepare_batch=DistillBatch, max_epochs=...)`` the student's.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    kept = list(range(len(images)))
    crop = RandSpatialCropd(keys=["image"], roi_size=[detector.patch_size] * 2, random_size=False)
    history = []
    for k in range(rounds):
        torch.manual_seed(seed * 1_000 + k)
        teacher = make_network().to(detector.mean.device)
        loader = DataLoader(Dataset([images[i] for i in kept], transform=crop), batch_size=batch_size, shuffle=True)
        trainer = make_trainer(
            network=teacher, optimizer=make_optimizer(teacher.parameters()), train_data_loader=loader
        )
        # each step in its own folder: a step resumes from the epoch checkpoint it finds beside its weights
        train_stage(f"round_{k}", trainer, os.path.join(output_dir, "stkd", f"round_{k}", "weights.pt"), output_dir,
                    seed=seed)  # fmt: skip
        history.append({"round": k, "trained_on": len(kept)})
        if k < rounds - 1:  # the images this round finds most anomalous leave the next round's training set
            detector.classifier = teacher
            features = fit_gaussian(detector, [images[i] for i in kept], shrinkage, keep=True)
            scores = [float(detector.score_map(f, images[i]["image"].shape[1:]).max()) for f, i in zip(features, kept)]
            kept = [kept[i] for i in keep_least_anomalous(scores, drop_fraction)]
    student = make_network().to(detector.mean.device)
    loader = DataLoader(Dataset([images[i] for i in kept], transform=crop), batch_size=batch_size, shuffle=True)
    trainer = make_trainer(
        network=FeatureStudent(student), optimizer=make_optimizer(student.parameters()), train_data_loader=loader,
        loss_function=nn.MSELoss(), prepare_batch=DistillBatch(teacher), max_epochs=distill_epochs,
    )  # fmt: skip
    train_stage("student", trainer, os.path.join(output_dir, "stkd", "student", "weights.pt"), output_dir, seed=seed)
    detector.classifier = student
    fit_gaussian(detector, [images[i] for i in kept], shrinkage)
    history.append({"round": "student", "trained_on": len(kept)})
    if distributed.is_main():
        entries = getattr(images, "data", None)  # the datalist entries behind the loaded (metadata-free) items
        kept_files = [str(entries[i]["image"]) if entries else item_filename(images[i]) for i in kept]
        write_json(os.path.join(output_dir, "stkd", "rounds.json"), {"rounds": history, "kept": kept_files})
    return detector
