"""Per-voxel Gaussian kernel density estimate of the image under its R reconstructions (Patel et al. 2023, eq. 2-4).

At every voxel the R reconstructed intensities ``x_r`` (N healed latents x M dropout decodes) define a density, and
the image is scored by its log-density there::

    h = (4 sigma^5 / (3 R))^(1/5) + eps          (Silverman's rule plus the paper's floor eps)
    L = log( (1/R) sum_r K((x - x_r) / h) / h ),  K = standard normal density

``sigma`` is the *unbiased* (R - 1) standard deviation of the R reconstructed intensities, the usual Silverman
choice (and scipy's ``gaussian_kde``). ``eps`` keeps a voxel that every reconstruction agrees on from getting a
zero-width kernel; the paper uses 12.75 on a 0-255 scale, i.e. 0.05 on the bundle's [0, 1] intensities.

The sum runs through a max-shifted log-sum-exp (stable far from every reconstruction) and is vectorised over
voxels in chunks, so that the working memory stays within ``max_bytes`` however large the volume: the
reconstructions themselves ([R, C, *S], CPU or GPU) are the caller's, only the temporaries are bounded here.
"""

from __future__ import annotations

import math

import torch

__all__ = ["CHANNEL_REDUCTIONS", "kde_chunk_size", "kde_log_density", "silverman_bandwidth"]

CHANNEL_REDUCTIONS = ("mean", "sum", "none")
# Live [R, chunk] buffers per voxel in _chunk_log_density: the (possibly converted) reconstructions and the
# working kernel matrix, which the log-sum-exp reuses in place.
_BUFFERS_PER_ELEMENT = 2
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def silverman_bandwidth(std: torch.Tensor, num_samples: int, epsilon: float) -> torch.Tensor:
    """Paper eq. 3: h = (4 sigma^5 / (3 R))^(1/5) + eps."""
    return (4.0 * std.pow(5) / (3.0 * num_samples)).pow(0.2) + epsilon


def kde_chunk_size(num_samples: int, max_bytes: int, dtype: torch.dtype = torch.float32) -> int:
    """Voxels per chunk so that the [R, chunk] temporaries fit in ``max_bytes`` (at least one voxel)."""
    per_voxel = _BUFFERS_PER_ELEMENT * num_samples * torch.empty((), dtype=dtype).element_size()
    return max(1, int(max_bytes) // per_voxel)


def _chunk_log_density(x: torch.Tensor, recon: torch.Tensor, epsilon: float, dtype: torch.dtype) -> torch.Tensor:
    """[v] intensities and [R, v] reconstructions -> [v] log-densities, with one [R, v] working buffer."""
    num_samples = recon.shape[0]
    recon = recon.to(dtype)
    x = x.to(dtype)
    std = recon.std(dim=0, correction=1 if num_samples > 1 else 0)
    h = silverman_bandwidth(std, num_samples, epsilon)
    z = recon.sub(x).div_(h)  # (x_r - x) / h; the sign does not matter to K
    z.square_().mul_(-0.5)  # log K + log sqrt(2 pi)
    peak = z.amax(dim=0)
    log_sum = z.sub_(peak).exp_().sum(dim=0).log_().add_(peak)
    return log_sum - math.log(num_samples) - h.log() - _LOG_SQRT_2PI


def kde_log_density(
    image: torch.Tensor,
    reconstructions: torch.Tensor,
    epsilon: float = 0.05,
    max_bytes: int = 256 * 2**20,
    channel_reduction: str = "mean",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Log-density of ``image`` under the per-voxel KDE of its reconstructions, chunked over voxels.

    Args:
        image: [C, *S] original intensities.
        reconstructions: [R, C, *S] on the same device (GPU when there is one: the KDE then runs there).
        epsilon: bandwidth floor, in the intensity units of the image (0.05 for [0, 1] intensities).
        max_bytes: budget for the temporaries; the chunk size follows from it (:func:`kde_chunk_size`).
        channel_reduction: channels are estimated independently (a product kernel would need a joint bandwidth
            the paper does not define); ``"mean"`` averages their log-densities into one map [1, *S] (the log of
            the geometric mean density, so the density threshold keeps its per-channel meaning), ``"sum"`` adds
            them (log of the product density), ``"none"`` returns [C, *S].
        dtype: compute dtype; float32 whatever the inputs (e.g. float16 decodes under AMP).
    """
    if channel_reduction not in CHANNEL_REDUCTIONS:
        raise ValueError(f"channel_reduction must be one of {CHANNEL_REDUCTIONS}, got {channel_reduction!r}.")
    if reconstructions.shape[1:] != image.shape:
        raise ValueError(f"reconstructions {tuple(reconstructions.shape)} must be [R, *{tuple(image.shape)}].")
    num_samples = reconstructions.shape[0]
    if num_samples < 1:
        raise ValueError("the KDE needs at least one reconstruction.")
    x = image.reshape(-1)
    recon = reconstructions.reshape(num_samples, -1)
    chunk = kde_chunk_size(num_samples, max_bytes, dtype)
    out = torch.empty(x.shape[0], dtype=dtype, device=image.device)
    for start in range(0, x.shape[0], chunk):
        stop = min(start + chunk, x.shape[0])
        out[start:stop] = _chunk_log_density(x[start:stop], recon[:, start:stop], epsilon, dtype)
    out = out.reshape(image.shape)
    if channel_reduction == "mean":
        return out.mean(dim=0, keepdim=True)
    if channel_reduction == "sum":
        return out.sum(dim=0, keepdim=True)
    return out
