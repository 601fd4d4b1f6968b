"""NSA, natural synthetic anomalies (Schlueter et al., ECCV 2022), a baseline of the paper's Table 1: a segmentation
network learns to find patches of other training images blended in seamlessly, and its output is the anomaly map.

Each training image gets one to ``max_patches`` boxes from another image of the batch, at another place, blended by
Poisson image editing (the patch's own gradients inside, the destination at the border), so that only texture and
structure, not an intensity edge, give it away. The target is continuous: per voxel, a logistic function of how much
the blend changed it (0 outside the boxes). MONAI's UNet, from random weights, is trained on it with binary
cross-entropy. Works in 2D and 3D (the Poisson solve is a discrete sine transform on the box).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.networks.nets import UNet
from scipy.fft import dstn, idstn
from torch import nn

from scripts.vqvae import eval_except

__all__ = ["NSABatch", "NSANet", "SegmentationDetector", "blend_patch", "poisson_blend"]


def _laplacian(x: np.ndarray) -> np.ndarray:
    """Discrete Laplacian of the interior of `x` (the border only enters as neighbours)."""
    inner = tuple(slice(1, -1) for _ in range(x.ndim))
    out = -2.0 * x.ndim * x[inner]
    for axis in range(x.ndim):
        for shift in (slice(2, None), slice(None, -2)):
            out = out + x[tuple(shift if a == axis else slice(1, -1) for a in range(x.ndim))]
    return out


def poisson_blend(destination: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Seamless cloning of a box: the result has `source`'s Laplacian inside and `destination`'s values on the box
    border. Solved exactly for the box with a type-I discrete sine transform (Dirichlet boundary)."""
    if destination.shape != source.shape or min(destination.shape) < 3:
        raise ValueError(f"boxes must match and be at least 3 voxels wide, got {destination.shape}, {source.shape}.")
    # f = source + h, h harmonic inside with h = destination - source on the border
    border = destination.astype(np.float64) - source.astype(np.float64)
    h = border.copy()
    inner = tuple(slice(1, -1) for _ in range(h.ndim))
    h[inner] = 0.0
    rhs = -_laplacian(h)  # the border's pull on the interior
    spectrum = dstn(rhs, type=1)
    eigen = sum(
        np.reshape(
            2.0 * np.cos(np.pi * np.arange(1, n + 1) / (n + 1)) - 2.0, [-1 if a == axis else 1 for a in range(h.ndim)]
        )
        for axis, n in enumerate(rhs.shape)
    )
    h[inner] = idstn(spectrum / eigen, type=1)
    return source + h


def blend_patch(
    destination: torch.Tensor, source: torch.Tensor, size: Sequence[float] = (0.1, 0.4), sharpness: float = 12.0,
    midpoint: float = 0.1, skip_background: Sequence[float] | None = None, attempts: int = 200,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One box of `source` ([C, *S], sides a ``size`` fraction of the image's) Poisson-blended into `destination`
    at another place: (the image, clamped to [0, 1] as the preprocessing gives it; the continuous target [*S]: the
    logistic ``1 / (1 + exp(-sharpness * (|change| - midpoint)))`` of the change, rescaled to 0 for an unchanged
    voxel; 0 outside the box).

    ``skip_background = (value, tolerance)``: as NSA does for objects, each box must be at least a quarter object,
    a voxel being object where its channel mean is more than `tolerance` from the background `value`; without such a
    box after `attempts` draws, nothing is blended. Without it, a whole-body volume's boxes are mostly air."""
    spatial = destination.shape[1:]
    fraction = size[0] + (size[1] - size[0]) * float(torch.rand(()))
    sides = [max(3, min(n, round(n * fraction))) for n in spatial]
    objects = [None, None]
    if skip_background is not None:
        value, tolerance = skip_background
        objects = [(image.mean(dim=0) - value).abs() > tolerance for image in (source, destination)]

    def box(object_mask: torch.Tensor | None) -> tuple[slice, ...] | None:
        for _ in range(attempts):
            corner = [int(torch.randint(0, n - k + 1, ())) for n, k in zip(spatial, sides)]
            at = tuple(slice(c, c + k) for c, k in zip(corner, sides))
            if object_mask is None or float(object_mask[at].float().mean()) >= 0.25:
                return at
        return None

    at_src = box(objects[0])
    at_dst = box(objects[1]) if at_src is not None else None
    if at_dst is None:
        return destination.clone(), torch.zeros(spatial, dtype=destination.dtype, device=destination.device)
    out = destination.clone()
    for c in range(destination.shape[0]):
        blended = poisson_blend(destination[c][at_dst].cpu().numpy(), source[c][at_src].cpu().numpy())
        out[c][at_dst] = torch.as_tensor(blended, dtype=destination.dtype).clamp(0.0, 1.0)
    change = (out - destination).abs().amax(dim=0)
    target = torch.zeros(spatial, dtype=destination.dtype, device=destination.device)
    floor = torch.sigmoid(torch.tensor(-sharpness * midpoint))  # rescaled so that an unchanged voxel is 0
    target[at_dst] = ((torch.sigmoid(sharpness * (change[at_dst] - midpoint)) - floor) / (1 - floor)).clamp_min(0)
    return out, target


class NSABatch:
    """`prepare_batch` for MONAI's `SupervisedTrainer`: each image with one to ``max_patches`` boxes of the next image
    of the batch blended in, and the continuous targets [B, 1, *S] (a target is the maximum over its boxes)."""

    def __init__(self, size: Sequence[float] = (0.1, 0.4), max_patches: int = 3, sharpness: float = 12.0,
                 midpoint: float = 0.1, skip_background: Sequence[float] | None = None) -> None:  # fmt: skip
        self.size, self.max_patches, self.sharpness, self.midpoint = size, max_patches, sharpness, midpoint
        self.skip_background = skip_background

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        images = torch.as_tensor(batchdata["image"]).float()
        inputs, targets = [], []
        for i, image in enumerate(images):
            source = images[(i + 1) % len(images)]
            target = torch.zeros(image.shape[1:])
            for _ in range(int(torch.randint(1, self.max_patches + 1, ()))):
                image, one = blend_patch(image, source, self.size, self.sharpness, self.midpoint, self.skip_background)
                target = torch.maximum(target, one)
            inputs.append(image)
            targets.append(target[None])
        return (torch.stack(inputs).to(device=device, non_blocking=non_blocking),
                torch.stack(targets).to(device=device, non_blocking=non_blocking))  # fmt: skip


class NSANet(UNet):
    """MONAI's UNet, from random weights, one output channel: the logit that a voxel belongs to a blended patch."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int] = (16, 32, 64, 128),
                 strides: Sequence[int] = (2, 2, 2), num_res_units: int = 1) -> None:  # fmt: skip
        super().__init__(spatial_dims, in_channels, 1, channels, strides, num_res_units=num_res_units)
        self.settings = dict(spatial_dims=spatial_dims, in_channels=in_channels, channels=list(channels),
                             strides=list(strides), num_res_units=num_res_units)  # fmt: skip


class SegmentationDetector(nn.Module):
    """A segmentation baseline as a detector (``network_def``): the score map is its probability [B, 1, *S]."""

    def __init__(self, segmenter: NSANet) -> None:
        super().__init__()
        self.segmenter = segmenter

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        with eval_except(self.segmenter):
            return torch.sigmoid(self.segmenter(image.float()).float())
