"""Scores of a labelled set for configs/evaluate.yaml: the exact metrics of :mod:`scripts.metrics` over every map,
written to ``metrics.json`` (set level and per category) and a per-image CSV."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from ignite.engine import Engine, Events

from scripts import metrics
from scripts.data import DataError
from scripts.detector import segment
from scripts.files import write_json
from scripts.inference import item_filename, relative_stem

logger = logging.getLogger(__name__)


def summarise(
    scores: Sequence[np.ndarray], labels: Sequence[np.ndarray], density_threshold: float, fpr_limit: float = 0.3
) -> dict[str, float | int | None]:
    """Set-level metrics of maps [*S] and binary labels [*S]; a metric the set cannot define (one class) is None."""
    out: dict[str, float | int | None] = {"n_images": len(scores)}
    out["n_anomalous_images"] = int(sum(bool(lab.any()) for lab in labels))
    try:
        pixel = metrics.pixel_metrics(scores, labels, fpr_limit)
        out.update(pixel_auroc=pixel["pixel_auroc"], aupro=pixel["aupro"], best_dice=pixel["best_dice"])
        out["best_dice_threshold"] = pixel["dice_threshold"]
    except ValueError as e:  # no anomalous (or no normal) pixel in this set
        logger.warning(f"pixel metrics undefined: {e}")
        out.update(pixel_auroc=None, aupro=None, best_dice=None, best_dice_threshold=None)
    try:
        out["image_auroc"] = metrics.image_auroc(scores, labels)
    except ValueError as e:
        logger.warning(f"image AUROC undefined: {e}")
        out["image_auroc"] = None
    tp = fp = fn = 0
    for s, lab in zip(scores, labels):
        seg, lab = segment(s, density_threshold), lab.astype(bool)
        tp, fp, fn = tp + int(np.sum(seg & lab)), fp + int(np.sum(seg & ~lab)), fn + int(np.sum(~seg & lab))
    out["dice_at_density_threshold"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return out


class AnomalyMetrics:
    """Handler: keeps each map and label (numpy, the network's grid) and scores the set when the epoch ends.

    Writes ``metrics.json`` (set-level and per-category metrics, see :func:`summarise`) and ``metrics_per_image.csv``.
    Metrics need every map of the set at once; they are kept as float32 arrays and bool labels, nothing else.
    """

    def __init__(
        self,
        output_dir: str,
        density_threshold: float,
        root: str | None = None,
        fpr_limit: float = 0.3,
        extra: dict | None = None,
    ) -> None:
        self.output_dir, self.density_threshold, self.root, self.fpr_limit = (
            output_dir,
            density_threshold,
            root,
            fpr_limit,
        )
        self.extra = dict(extra or {})
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.rows: list[dict] = []
        self.categories: list[str | None] = []
        self.results: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.scores, self.labels, self.rows, self.categories = [], [], [], []

    def _collect(self, engine: Engine) -> None:
        batches = engine.state.batch if isinstance(engine.state.batch, list) else [{}] * len(engine.state.output)
        for entry, item in zip(batches, engine.state.output):
            if item.get("label") is None:
                raise DataError(f"{item_filename(item)}: evaluation needs a label for every image")
            score = item["score"][0].detach().cpu().float().numpy()
            label = item["label"][0].detach().cpu().numpy() > 0
            category = entry.get("category")
            self.scores.append(score)
            self.labels.append(label)
            self.categories.append(None if category is None else str(category))
            seg = segment(score, self.density_threshold)
            inter, total = int(np.sum(seg & label)), int(seg.sum() + label.sum())
            self.rows.append({
                "image": relative_stem(item_filename(item), self.root),
                "category": "" if category is None else category,
                "anomalous": int(label.any()),
                "image_score": float(score.max()),
                "mean_score": float(score.mean()),
                "label_voxels": int(label.sum()),
                "segmented_voxels": int(seg.sum()),
                "dice_at_density_threshold": 2 * inter / total if total else float("nan"),
            })  # fmt: skip

    def _write(self, engine: Engine) -> None:
        results: dict[str, Any] = {
            **self.extra,
            "density_threshold": self.density_threshold,
            "fpr_limit": self.fpr_limit,
        }
        results.update(summarise(self.scores, self.labels, self.density_threshold, self.fpr_limit))
        named = sorted({c for c in self.categories if c is not None})
        if named:
            results["per_category"] = {
                c: summarise(*self._subset(c), self.density_threshold, self.fpr_limit) for c in named
            }
        os.makedirs(self.output_dir, exist_ok=True)
        write_json(os.path.join(self.output_dir, "metrics.json"), results)
        with open(os.path.join(self.output_dir, "metrics_per_image.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]) if self.rows else ["image"])
            writer.writeheader()
            writer.writerows(self.rows)
        shown = {k: v for k, v in results.items() if k != "per_category"}
        # scalars as engine metrics too: MONAI's handlers (e.g. MLFlowHandler under `--tracking mlflow`) log those
        engine.state.metrics.update(
            {k: v for k, v in shown.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )
        logger.info(
            "evaluation: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        )
        self.results = results

    def _subset(self, category: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        idx = [i for i, c in enumerate(self.categories) if c == category]
        return [self.scores[i] for i in idx], [self.labels[i] for i in idx]
