"""Scores of a labelled set for configs/evaluate.yaml: the exact metrics of :mod:`scripts.metrics` over every map,
written to ``metrics.json`` (set level and per category); per-image values go to MONAI's ``MetricsSaver``."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai import handlers

from scripts import distributed, metrics, tracking
from scripts.checkpoint import flatten
from scripts.data import DataError
from scripts.detector import segment
from scripts.files import write_json
from scripts.inference import item_filename, output_name

logger = logging.getLogger(__name__)

# per-image values (MONAI's metric details): 1 if the label has any anomalous voxel, the image score (maximum of the
# map), the mean score, labelled and segmented voxels, the Dice of the detector's own segmentation, and the image's
# own AUPRO (NaN without anomalous or normal voxels), which `python -m scripts.experiments compare` pairs image by image
MOST = 0.5  # a segmentation marking more of the voxels than this marks more than anomalies: warned
PER_IMAGE = (
    "anomalous", "image_score", "mean_score", "label_voxels", "segmented_voxels", "dice_at_density_threshold", "aupro"
)  # fmt: skip


def summarise(
    scores: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    density_threshold: float | None,
    fpr_limit: float = 0.3,
    warn: bool = True,
) -> dict[str, float | int | None]:
    """Set-level metrics of maps [*S] and binary labels [*S]; a metric the set cannot define (one class) is None, as
    is the Dice at the density threshold of a map that has none (a baseline's: `density_threshold` None). `warn`
    False for the per-category subsets, whose nulls metrics.json shows (one category logged each warning twice)."""
    out: dict[str, float | int | None] = {"n_images": len(scores)}
    out["n_anomalous_images"] = int(sum(bool(lab.any()) for lab in labels))
    try:
        pixel = metrics.pixel_metrics(scores, labels, fpr_limit)
        out.update(pixel_auroc=pixel["pixel_auroc"], aupro=pixel["aupro"], best_dice=pixel["best_dice"])
        out["best_dice_threshold"] = pixel["dice_threshold"]
    except ValueError as e:  # no anomalous (or no normal) pixel in this set
        if warn:
            logger.warning(f"pixel metrics not reported (null): {e}")
        out.update(pixel_auroc=None, aupro=None, best_dice=None, best_dice_threshold=None)
    try:
        out["image_auroc"] = metrics.image_auroc(scores, labels)
    except ValueError as e:
        if warn:
            logger.warning(f"{e}; reported as null")
        out["image_auroc"] = None
    out["dice_at_density_threshold"] = None
    if len(scores) and density_threshold is not None:
        counts = np.sum([overlap(segment(s, density_threshold), lab) for s, lab in zip(scores, labels)], axis=0)
        out["dice_at_density_threshold"] = dice(*map(int, counts))
    return out


def overlap(seg: np.ndarray, label: np.ndarray) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of a binary segmentation."""
    seg, label = seg.astype(bool), label.astype(bool)
    return int(np.sum(seg & label)), int(np.sum(seg & ~label)), int(np.sum(~seg & label))


def dice(tp: int, fp: int, fn: int) -> float | None:
    """2TP / (2TP + FP + FN); None when both the segmentation and the label are empty."""
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None


def image_names(batch: Sequence[dict], root: str | None) -> list[dict]:
    """MetricsSaver's `batch_transform`: each image by the name its maps have (folders below `root` kept)."""
    return [{"filename_or_obj": output_name(item_filename(entry), root)} for entry in batch]


class MetricsSaver(handlers.MetricsSaver):
    """MONAI's ``MetricsSaver`` without numpy's warnings where a per-image value is undefined on every image (the
    Dice of a set without anomalies): its summary row is NaN, as MONAI writes it anyway."""

    def __call__(self, engine: Engine) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Mean of empty slice|All-NaN slice|Degrees of freedom", RuntimeWarning)
            super().__call__(engine)


class AnomalyMetrics:
    """Handler: keeps each map and label (numpy, the network's grid) and scores the set when the epoch ends.

    Writes ``metrics.json`` (set-level and per-category metrics, see :func:`summarise`) and puts the set-level scalars
    in ``engine.state.metrics`` and the per-image values (:data:`PER_IMAGE`) in ``engine.state.metric_details``, where
    MONAI's ``MetricsSaver`` (configs/evaluate.yaml) writes them as ``<name>_raw.csv`` with a summary.
    Metrics need every map of the set at once; they are kept as float32 arrays and bool labels, nothing else.
    """

    def __init__(
        self, output_dir: str, density_threshold: float | None, fpr_limit: float = 0.3, extra: dict | None = None
    ):
        self.output_dir, self.density_threshold, self.fpr_limit = output_dir, density_threshold, fpr_limit
        self.extra = dict(extra or {})
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.categories: list[str | None] = []
        self.names: list[str] = []
        self.results: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.scores, self.labels, self.categories, self.names = [], [], [], []

    def _collect(self, engine: Engine) -> None:
        batches = engine.state.batch if isinstance(engine.state.batch, list) else [{}] * len(engine.state.output)
        for entry, item in zip(batches, engine.state.output):
            if item.get("label") is None:
                raise DataError(f"{item_filename(item)}: evaluation needs a label for every image")
            category = entry.get("category")
            self.scores.append(item["score"][0].detach().cpu().float().numpy())
            self.labels.append(item["label"][0].detach().cpu().numpy() > 0)
            self.categories.append(None if category is None else str(category))
            self.names.append(str(item_filename(item)))

    def per_image(self) -> dict[str, torch.Tensor]:
        """Each of :data:`PER_IMAGE` as an [N, 1] tensor, MONAI's layout of metric details."""
        rows = []
        for score, label in zip(self.scores, self.labels):
            seg, per_image_dice = None, None  # a map without a threshold of its own: NaN
            if self.density_threshold is not None:
                seg = segment(score, self.density_threshold)
                per_image_dice = dice(*overlap(seg, label))
            rows.append([float(label.any()), float(score.max()), float(score.mean()), float(label.sum()),
                         float("nan") if seg is None else float(seg.sum()),
                         float("nan") if per_image_dice is None else per_image_dice,
                         metrics.image_aupro(score, label, self.fpr_limit)])  # fmt: skip
        table = torch.tensor(rows, dtype=torch.float64).reshape(-1, len(PER_IMAGE))
        return {name: table[:, i : i + 1] for i, name in enumerate(PER_IMAGE)}

    def _write(self, engine: Engine) -> None:
        if distributed.active():  # every rank's maps to rank 0, in rank order (as MetricsSaver gathers the names)
            self.scores, self.labels, self.categories, self.names = (
                [x for part in distributed.gather(kept) for x in part]
                for kept in (self.scores, self.labels, self.categories, self.names)
            )
            if not distributed.is_main():
                return
        results: dict[str, Any] = {
            **self.extra,
            "density_threshold": self.density_threshold,
            "fpr_limit": self.fpr_limit,
        }
        order = sorted(range(len(self.names)), key=self.names.__getitem__)  # one summation order, however sharded
        results.update(summarise(*self._subset(order), self.density_threshold, self.fpr_limit))
        named = sorted({c for c in self.categories if c is not None})
        if named:
            results["per_category"] = {
                c: summarise(
                    *self._subset([i for i in order if self.categories[i] == c]),
                    self.density_threshold,
                    self.fpr_limit,
                    warn=False,
                )
                for c in named
            }
        details = self.per_image()
        if self.density_threshold is not None and self.scores:  # what a threshold far off looks like
            results["segmented_share"] = float(details["segmented_voxels"].sum()) / sum(s.size for s in self.scores)
            if results["segmented_share"] > MOST:
                logger.warning(
                    f"the segmentation at density_threshold {self.density_threshold:.3g} marks "
                    f"{results['segmented_share']:.0%} of the voxels of these {len(self.scores)} images: the threshold "
                    "is far from where this detector's densities lie (an undertrained model, or intensities on "
                    "another scale); its maps may still rank voxels well (AUPRO, pixel AUROC)"
                )
        os.makedirs(self.output_dir, exist_ok=True)
        write_json(os.path.join(self.output_dir, "metrics.json"), results)
        engine.state.metric_details.update(details)
        shown = {k: v for k, v in results.items() if k != "per_category"}
        # the metrics as engine metrics too, which MONAI's handlers log (MLFlowHandler under `--tracking mlflow`); what
        # made them (checkpoint, settings, labels) as the MLflow run's params, not as metrics
        settings = {k: v for k, v in shown.items() if k in self.extra or k in ("density_threshold", "fpr_limit")}
        engine.state.metrics.update(
            {
                k: v
                for k, v in shown.items()
                if k not in settings and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
        tracking.log_run_params(engine, flatten(settings))
        logger.info(
            "evaluation: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        )
        self.results = results

    def _subset(self, idx: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return [self.scores[i] for i in idx], [self.labels[i] for i in idx]
