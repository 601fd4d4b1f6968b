"""CutPaste (Li et al., CVPR 2021), a baseline of the paper's Table 1: self-supervised 3-way classification, then a
Gaussian density of the learned patch features localises anomalies.

Training: each batch of image patches goes in three times, as it is (class 0), with a CutPaste rectangle (class 1:
a rectangle cut from the patch, jittered, pasted elsewhere) and with a CutPaste scar (class 2: a thin rotated strip).
MONAI's ResNet-18, from random weights, learns to tell them apart. Localisation, as the paper's: a Gaussian (mean,
shrunk covariance) is fitted to the features of every training patch; a test patch scores its Mahalanobis distance,
and each pixel the mean of the patches over it, Gaussian-smoothed. Trained on contaminated data, the Gaussian takes
in the anomalous patches as well. 2D only: the scar is a rotated 2D strip, and the paper's method is 2D.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from monai.networks.layers import GaussianFilter
from monai.networks.nets import resnet18
from torch import nn

from scripts.vqvae import eval_except

__all__ = ["CutPasteBatch", "CutPasteNet", "PatchGaussianDetector", "cutpaste", "fit_gaussian", "scar"]


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _jitter(patch: torch.Tensor, amount: float) -> torch.Tensor:
    """Brightness and contrast jitter of a grey-value patch, kept in the image's [0, 1] range."""
    contrast, brightness = 1 + _uniform(-amount, amount), _uniform(-amount, amount)
    mean = patch.mean()
    return ((patch - mean) * contrast + mean + brightness).clamp(0.0, 1.0)


def cutpaste(
    image: torch.Tensor,
    area: Sequence[float] = (0.02, 0.15),
    aspect: Sequence[float] = (0.3, 3.3),
    jitter: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A rectangle of ``area`` (fraction of the image) and ``aspect`` (height / width, log-uniform) cut from one place
    of [C, H, W] `image`, jittered, and pasted at another: (the new image, [H, W] bool mask of the pasted pixels)."""
    _, height, width = image.shape
    size = _uniform(*area) * height * width
    ratio = math.exp(_uniform(math.log(aspect[0]), math.log(aspect[1])))
    h = max(1, min(height - 1, round(math.sqrt(size * ratio))))
    w = max(1, min(width - 1, round(math.sqrt(size / ratio))))
    sy, sx, dy, dx = (int(torch.randint(0, n - k + 1, ())) for n, k in ((height, h), (width, w)) * 2)
    out, mask = image.clone(), torch.zeros((height, width), dtype=torch.bool, device=image.device)
    out[:, dy : dy + h, dx : dx + w] = _jitter(image[:, sy : sy + h, sx : sx + w], jitter)
    mask[dy : dy + h, dx : dx + w] = True
    return out, mask


def scar(
    image: torch.Tensor,
    width: Sequence[float] = (2 / 256, 16 / 256),
    length: Sequence[float] = (10 / 256, 25 / 256),
    jitter: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A thin strip (``width`` x ``length``, fractions of the image side, at least one pixel wide) at a random angle
    in [-45, 45] degrees, filled with the pixels of another place of [C, H, W] `image`, jittered: (image, mask)."""
    _, height, side = image.shape
    w = max(1.0, _uniform(*width) * max(height, side))
    long = max(w + 1.0, _uniform(*length) * max(height, side))
    angle = math.radians(_uniform(-45.0, 45.0))
    cy, cx = _uniform(0, height - 1), _uniform(0, side - 1)
    y, x = torch.meshgrid(
        torch.arange(height, device=image.device) - cy, torch.arange(side, device=image.device) - cx, indexing="ij"
    )
    along, across = y * math.cos(angle) + x * math.sin(angle), -y * math.sin(angle) + x * math.cos(angle)
    mask = (along.abs() <= long / 2) & (across.abs() <= w / 2)
    shift = (int(torch.randint(1, height, ())), int(torch.randint(1, side, ())))
    source = _jitter(torch.roll(image, shift, dims=(1, 2)), jitter)
    return torch.where(mask, source, image), mask


class CutPasteBatch:
    """`prepare_batch` for MONAI's `SupervisedTrainer`: the batch of patches as it is, with a CutPaste rectangle and
    with a scar, and their classes 0, 1, 2 as targets (the paper's 3-way task)."""

    def __init__(self, area: Sequence[float], aspect: Sequence[float], width: Sequence[float],
                 length: Sequence[float], jitter: float = 0.1) -> None:  # fmt: skip
        self.area, self.aspect, self.width, self.length, self.jitter = area, aspect, width, length, jitter

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        images = torch.as_tensor(batchdata["image"]).float()
        pasted = torch.stack([cutpaste(x, self.area, self.aspect, self.jitter)[0] for x in images])
        scarred = torch.stack([scar(x, self.width, self.length, self.jitter)[0] for x in images])
        inputs = torch.cat([images, pasted, scarred]).to(device=device, non_blocking=non_blocking)
        targets = torch.arange(3).repeat_interleave(len(images)).to(device=device)
        return inputs, targets


class CutPasteNet(nn.Module):
    """MONAI's ResNet-18 from random weights (no download), its pooled 512 features, and a small head for the 3
    classes; `features` is what the density is fitted on."""

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, head_width: int = 128) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(
                f"CutPaste is a 2D method (its scar is a rotated 2D strip); got spatial_dims={spatial_dims}."
            )
        self.settings = dict(spatial_dims=spatial_dims, in_channels=in_channels, head_width=head_width)
        self.encoder = resnet18(spatial_dims=spatial_dims, n_input_channels=in_channels, feed_forward=False)
        self.head = nn.Sequential(nn.Linear(512, head_width), nn.ReLU(inplace=True), nn.Linear(head_width, 3))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class PatchGaussianDetector(nn.Module):
    """CutPaste's localisation as a detector (``network_def``): score map [B, 1, H, W] = per pixel, the mean
    Mahalanobis distance of the patches over it, Gaussian-smoothed (``sigma`` pixels); higher = more anomalous.

    The Gaussian (``mean``, ``precision``) is a buffer, so it is saved with the weights (:func:`fit_gaussian`).
    """

    def __init__(self, classifier: CutPasteNet, patch_size: int, stride: int, sigma: float = 4.0,
                 batch_size: int = 256) -> None:  # fmt: skip
        super().__init__()
        if patch_size < 1 or stride < 1:
            raise ValueError(f"patch_size and stride must be >= 1, got {patch_size} and {stride}.")
        self.classifier, self.patch_size, self.stride, self.sigma = classifier, patch_size, stride, sigma
        self.batch_size = batch_size
        self.register_buffer("mean", torch.zeros(512))
        self.register_buffer("precision", torch.eye(512))

    def positions(self, size: int) -> list[int]:
        """Patch corners along one side: every ``stride`` pixels, and the last patch flush with the border."""
        if size < self.patch_size:
            raise ValueError(f"image side {size} is smaller than the patch size {self.patch_size}.")
        return sorted(set(range(0, size - self.patch_size + 1, self.stride)) | {size - self.patch_size})

    def patches(self, image: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """[C, H, W] -> every patch [P, C, p, p] and its corner."""
        p = self.patch_size
        corners = [(y, x) for y in self.positions(image.shape[1]) for x in self.positions(image.shape[2])]
        return torch.stack([image[:, y : y + p, x : x + p] for y, x in corners]), corners

    @torch.no_grad()
    def patch_features(self, patches: torch.Tensor) -> torch.Tensor:
        with eval_except(self.classifier):
            return torch.cat([self.classifier.features(c) for c in patches.split(self.batch_size)]).double()

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.score_map(self.image_features(one), one.shape[1:]) for one in image.float()])

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """Features [P, 512] of every patch of one image [C, H, W], in the order of :meth:`patches`."""
        return self.patch_features(self.patches(image)[0])

    def score_map(self, features: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """One image's map [1, H, W] from its patch features: Mahalanobis distances, averaged per pixel, smoothed."""
        centred = features.double() - self.mean.double()
        distance = ((centred @ self.precision.double()) * centred).sum(dim=1).clamp_min(0).sqrt()
        total = torch.zeros(tuple(shape), dtype=torch.float64, device=features.device)
        count = torch.zeros_like(total)
        corners = [(y, x) for y in self.positions(shape[0]) for x in self.positions(shape[1])]
        for d, (y, x) in zip(distance, corners):
            total[y : y + self.patch_size, x : x + self.patch_size] += d
            count[y : y + self.patch_size, x : x + self.patch_size] += 1
        score = (total / count).float()[None, None]
        if self.sigma <= 0:
            return score[0]
        smooth = GaussianFilter(2, self.sigma).to(score.device)  # zero-padded: divided by the smoothed ones, so
        return (smooth(score) / smooth(torch.ones_like(score)))[0]  # the border is not dimmed


@torch.no_grad()
def fit_gaussian(
    detector: PatchGaussianDetector, images: Iterable[dict], shrinkage: float = 0.01, keep: bool = False
) -> list[torch.Tensor]:
    """The Gaussian of every training patch's features: mean, and the covariance shrunk towards a scaled identity
    (``shrinkage`` of the way; without it 512 features of a few thousand patches give a singular covariance).
    ``keep``: return each image's patch features (float32), to score the same images without computing them again."""
    total, outer, n, kept = 0.0, 0.0, 0, []
    for item in images:
        features = detector.image_features(torch.as_tensor(item["image"]).float().to(detector.mean.device))
        total, outer, n = total + features.sum(0), outer + features.T @ features, n + len(features)
        kept += [features.float()] if keep else []
    if not n:
        raise ValueError("fit_gaussian needs at least one training image.")
    mean = total / n
    covariance = (outer - n * torch.outer(mean, mean)) / max(1, n - 1)
    scale = torch.trace(covariance) / len(covariance)
    identity = torch.eye(len(covariance), dtype=covariance.dtype, device=covariance.device)
    covariance = (1 - shrinkage) * covariance + shrinkage * scale * identity
    detector.mean.copy_(mean.float())
    detector.precision.copy_(torch.linalg.inv(covariance).float())
    return kept
