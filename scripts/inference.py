"""Inference and evaluation glue for configs/inference.yaml and configs/evaluate.yaml.

The detector (``network_def``) already returns the score map; what is here only moves maps between MONAI's engine and
disk: the input list (datalist section or a folder), an inferer that keeps the input's metadata on the map (so that
MONAI's writers and ``Invertd`` know the file and its affine), PNG overlays for people to look at, and the handler
that scores a labelled set with :mod:`scripts.metrics` and writes ``metrics.json`` and a per-image CSV.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform

from scripts import metrics
from scripts.data import DataError, load_datalist
from scripts.detector import segment
from scripts.files import write_json
from scripts.plots import figure

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def input_files(
    folder: str | None, datalist: str | None, dataset_dir: str, section: str = "test", labels: str = "auto"
) -> list[dict]:
    """The images to process: every image file in `folder` (sorted) when given, else a datalist section.

    `labels` as in :func:`scripts.data.load_datalist` ("require" for evaluation, "auto" for plain inference).
    """
    if not folder:
        files = load_datalist(datalist, dataset_dir, section, labels)
    else:
        if not os.path.isdir(folder):
            raise DataError(f"{folder}: input folder not found")
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
        if not names:
            raise DataError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        files = [{"image": os.path.join(folder, n)} for n in names]
    check_inputs(files, folder or dataset_dir)
    return files


def unreadable(path: str) -> str | None:
    """Why `path` cannot be an input, from what is cheap to check before any work (None: nothing found)."""
    if not os.path.isfile(path):
        return "not found"
    if os.path.getsize(path) == 0:
        return "empty file"
    lower = path.lower()
    try:
        if lower.endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
            from PIL import Image

            with Image.open(path) as image:
                image.verify()  # reads the file's structure and checksums, decodes no pixels
        elif lower.endswith(".nii"):
            import nibabel as nib

            image = nib.load(path)
            needed = int(image.dataobj.offset) + int(np.prod(image.shape)) * image.get_data_dtype().itemsize
            if os.path.getsize(path) < needed:
                return f"truncated NIfTI ({os.path.getsize(path)} of {needed} bytes)"
        elif lower.endswith(".nii.gz"):
            import nibabel as nib

            nib.load(path)  # the header
    except Exception as e:  # noqa: BLE001 - whatever the reader says is the cause
        return f"cannot be read ({type(e).__name__}: {e})"
    return None


def check_inputs(files: Sequence[dict], root: str | None) -> None:
    """Every input readable and every output name its own, before any map is computed; all problems at once."""
    problems = [f"{entry[key]}: {why}" for entry in files for key in ("image", "label")
                if key in entry and (why := unreadable(str(entry[key])))]  # fmt: skip
    names: dict[str, str] = {}
    for entry in files:
        name = relative_stem(str(entry["image"]), root)
        if name in names:
            problems.append(f"{entry['image']}: its maps would overwrite those of {names[name]} (both <{name}>_*)")
        names.setdefault(name, str(entry["image"]))
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise DataError(
            f"{len(problems)} of {len(files)} inputs cannot be processed; nothing was written:\n  "
            + "\n  ".join(shown)
            + "\nRemove or replace these files (rename one of each pair with the same name) and run again."
        )


def relative_stem(path: str, root: str | None) -> str:
    """`root`-relative path without extension: output names keep the input's folders (MVTec repeats file names)."""
    path = os.path.abspath(str(path))
    if root and os.path.abspath(path).startswith(os.path.abspath(root) + os.sep):
        path = os.path.relpath(path, os.path.abspath(root))
    else:
        path = os.path.basename(path)
    for ext in sorted(IMAGE_EXTENSIONS, key=len, reverse=True):
        if path.lower().endswith(ext):
            return path[: -len(ext)]
    return os.path.splitext(path)[0]


def _filename(item: dict) -> str:
    for key in ("pred", "image"):
        meta = getattr(item.get(key), "meta", None) or {}
        if "filename_or_obj" in meta:
            return str(meta["filename_or_obj"])
    return "image"


class AnomalyInferer(Inferer):
    """Calls the detector on a plain tensor and gives the map the input's metadata back.

    The detector runs thousands of small tensor operations per image (healing, KDE); MetaTensor's bookkeeping on each
    would cost time and carries nothing the detector uses. The map returned has the input's metadata (file name,
    affine, applied transforms), which ``SaveImaged`` and ``Invertd`` need.
    """

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        score = network(plain, *args, **kwargs)
        if not isinstance(inputs, MetaTensor):
            return score
        out = MetaTensor(score, meta=inputs.meta, applied_operations=inputs.applied_operations)
        out.is_batch = inputs.is_batch
        return out


class AnomalyOutputd(MapTransform):
    """The score map on the input's grid becomes `score_map`, its label map `segmentation` (uint8, 1 = anomaly), and
    `pred` one of them: MONAI Label and viewers write `pred` with the input's format (a PNG cannot hold floats) and
    read its values as labels. The request key `anomaly_output` ("segmentation" or "score") chooses; `result`
    (MONAI Label's JSON answer) gets the image score and the anomalous fraction.
    """

    OUTPUTS = ("segmentation", "score")

    def __init__(self, keys: KeysCollection, density_threshold: float, default: str = "segmentation") -> None:
        super().__init__(keys)
        if default not in self.OUTPUTS:
            raise ValueError(f"anomaly_output must be one of {self.OUTPUTS}, got {default!r}")
        self.density_threshold, self.default = density_threshold, default

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        choice = d.get("anomaly_output") or self.default
        if choice not in self.OUTPUTS:
            raise ValueError(f"anomaly_output must be one of {self.OUTPUTS}, got {choice!r}")
        for key in self.key_iterator(d):
            score = d[key].float()
            seg = segment(score, self.density_threshold).to(torch.uint8)
            d["score_map"], d["segmentation"] = score, seg
            d[key] = seg if choice == "segmentation" else score
            d["result"] = {
                **(d.get("result") or {}),
                "image_score": float(score.max()),
                "anomalous_fraction": float(seg.float().mean()),
                "density_threshold": self.density_threshold,
            }
        return d


class SaveOverlays:
    """Handler: one PNG per image with the image, its score map, the segmentation and (if known) the true mask.

    2D images are shown as they are; 3D volumes as coronal maximum-intensity projections (PET readers' view). Drawn
    with matplotlib's Agg canvas (no pyplot state, safe in worker processes and headless machines).
    """

    def __init__(self, output_dir: str, density_threshold: float, root: str | None = None, dpi: int = 80) -> None:
        self.output_dir, self.density_threshold, self.root, self.dpi = output_dir, density_threshold, root, dpi

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for item in engine.state.output:
            path = os.path.join(self.output_dir, relative_stem(_filename(item), self.root) + "_overlay.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_overlay(path, item["image"], item["score"], self.density_threshold, item.get("label"), self.dpi)


def _view(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """[C, *S] -> what imshow shows: 2D transposed (rows = second axis), 3D a coronal MIP; channels last or dropped."""
    x = np.asarray(x.detach().cpu().float() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    if x.ndim == 4:
        x = x.max(axis=2)  # [C, X, Y, Z] -> [C, X, Z]
    x = np.swapaxes(x, 1, 2)
    return np.moveaxis(x, 0, -1) if x.shape[0] == 3 else x[0]


def save_overlay(
    path: str,
    image: torch.Tensor,
    score: torch.Tensor,
    density_threshold: float,
    label: torch.Tensor | None = None,
    dpi: int = 80,
) -> None:
    """Image | score map | segmentation (red) with the true mask's outline (green) if given."""
    origin = "lower" if image.ndim == 4 else "upper"
    shown, scores = np.clip(_view(image), 0, 1), _view(score)
    fig = figure(figsize=(7.5, 2.8), dpi=dpi)
    axes = fig.subplots(1, 3)
    axes[0].imshow(shown, cmap="gray", vmin=0, vmax=1, origin=origin)
    axes[0].set_title("image", fontsize=8)
    im = axes[1].imshow(scores, cmap="inferno", origin=origin)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02)
    axes[1].set_title("score (-log density)", fontsize=8)
    axes[2].imshow(shown, cmap="gray", vmin=0, vmax=1, origin=origin)
    axes[2].imshow(
        np.ma.masked_where(~segment(scores, density_threshold), np.ones_like(scores)),
        cmap="autumn",
        alpha=0.5,
        origin=origin,
    )
    if label is not None and isinstance(label, torch.Tensor) and label.ndim == image.ndim and label.any():
        axes[2].contour(_view(label > 0).astype(float), levels=[0.5], colors="lime", linewidths=0.8, origin=origin)
    axes[2].set_title("segmentation (green: truth)", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(os.path.basename(path), fontsize=7)
    fig.savefig(path, format="png", metadata={"Software": None})


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
                raise DataError(f"{_filename(item)}: evaluation needs a label for every image")
            score = item["score"][0].detach().cpu().float().numpy()
            label = item["label"][0].detach().cpu().numpy() > 0
            category = entry.get("category")
            self.scores.append(score)
            self.labels.append(label)
            self.categories.append(None if category is None else str(category))
            seg = segment(score, self.density_threshold)
            inter, total = int(np.sum(seg & label)), int(seg.sum() + label.sum())
            self.rows.append({
                "image": relative_stem(_filename(item), self.root),
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
