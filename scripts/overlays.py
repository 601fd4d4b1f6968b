"""PNG overlays for people to look at: image, score map and segmentation side by side, one per input."""

from __future__ import annotations

import os

import numpy as np
import torch
from ignite.engine import Engine, Events

from scripts.detector import segment
from scripts.inference import item_filename, output_name
from scripts.plots import figure


class SaveOverlays:
    """Handler: one PNG per image with the image, its score map, the segmentation and (if known) the true mask.

    2D images are shown as they are; 3D volumes as coronal maximum-intensity projections (PET readers' view). Drawn
    with matplotlib's Agg canvas (no pyplot state, safe in worker processes and headless machines).
    """

    def __init__(
        self, output_dir: str, density_threshold: float | None, root: str | None = None, dpi: int = 80
    ) -> None:
        self.output_dir, self.density_threshold, self.root, self.dpi = output_dir, density_threshold, root, dpi

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for item in engine.state.output:
            name = output_name(item_filename(item), self.root)
            path = os.path.join(self.output_dir, name + "_overlay.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_overlay(path, item["image"], item["score"], self.density_threshold, item.get("label"), self.dpi, name)


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
    density_threshold: float | None,
    label: torch.Tensor | None = None,
    dpi: int = 80,
    title: str | None = None,
) -> None:
    """Image | score map | segmentation (red) with the true mask's outline (green) if given. Without a density
    threshold (a baseline's map is no density) the third panel is the image with the outline alone. `title`: the
    input's path below the input root, since one file name (autoPET's SUV.nii.gz) can name every input."""
    origin = "lower" if image.ndim == 4 else "upper"
    shown, scores = np.clip(_view(image), 0, 1), _view(score)
    fig = figure(figsize=(7.5, 2.8), dpi=dpi)
    axes = fig.subplots(1, 3)
    axes[0].imshow(shown, cmap="gray", vmin=0, vmax=1, origin=origin)
    axes[0].set_title("image", fontsize=8)
    im = axes[1].imshow(scores, cmap="inferno", origin=origin)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02)
    axes[1].set_title("anomaly score" if density_threshold is None else "score (-log density)", fontsize=8)
    axes[2].imshow(shown, cmap="gray", vmin=0, vmax=1, origin=origin)
    if density_threshold is not None:
        axes[2].imshow(
            np.ma.masked_where(~segment(scores, density_threshold), np.ones_like(scores)),
            cmap="autumn",
            alpha=0.5,
            origin=origin,
        )
    labelled = label is not None and isinstance(label, torch.Tensor) and label.ndim == image.ndim
    if labelled and label.any():  # no `origin`: contour's default puts Z[i, j] at (j, i), imshow's pixel centres
        axes[2].contour(_view(label > 0).astype(float), levels=[0.5], colors="lime", linewidths=0.8)
    if density_threshold is None:
        panel = "truth (green)" if labelled else "image"
    else:
        panel = "segmentation" + (" (green: truth)" if labelled else "")
    axes[2].set_title(panel, fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title or os.path.basename(path), fontsize=7)
    fig.savefig(path, format="png", metadata={"Software": None})
