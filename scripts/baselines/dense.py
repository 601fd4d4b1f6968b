"""The dense autoencoder and the dense VAE of Baur et al. (2018), baselines of the paper's Table 1 (Patel et al. 2023).

Both map a voxel's anomaly as its residual ``|x - x_hat|``: they learn to reconstruct the training images, and what
they cannot reconstruct is taken as anomalous. Trained on contaminated data they learn the anomalies too, which is
what ILTM's masking is meant to avoid (configs/baseline_dense.yaml, docs/README.md "Baselines").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import VarAutoEncoder
from torch import nn

from scripts.vqvae import eval_except

__all__ = ["DenseAutoEncoder", "DenseLoss", "ResidualDetector"]


class DenseAutoEncoder(VarAutoEncoder):
    """MONAI's ``VarAutoEncoder``: a convolutional encoder and decoder around a dense (fully connected) bottleneck.

    ``variational=False`` is the dense AE: the latent is the encoder's mean, never sampled, and the loss has no KL
    term. ``variational=True`` is the dense VAE. At inference both decode the mean latent, so the map is the residual
    of the mean reconstruction (MONAI's ``use_mean_at_inference``).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        image_size: Sequence[int],
        latent_size: int = 128,
        channels: Sequence[int] = (32, 64, 128, 128),
        strides: Sequence[int] = (2, 2, 2, 2),
        num_res_units: int = 1,
        variational: bool = False,
    ) -> None:
        if len(image_size) != spatial_dims:
            raise ValueError(f"image_size {list(image_size)} must have {spatial_dims} entries (spatial_dims).")
        super().__init__(
            spatial_dims=spatial_dims,
            in_shape=(in_channels, *image_size),
            out_channels=in_channels,
            latent_size=latent_size,
            channels=channels,
            strides=strides,
            num_res_units=num_res_units,
            use_sigmoid=False,
            use_mean_at_inference=True,
        )
        self.variational = bool(variational)
        self.settings = dict(  # what a checkpoint records to rebuild this network (scripts/checkpoint.py)
            spatial_dims=spatial_dims, in_channels=in_channels, image_size=list(image_size), latent_size=latent_size,
            channels=list(channels), strides=list(strides), num_res_units=num_res_units, variational=self.variational,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, mu, logvar); the latent is sampled only by a VAE in training."""
        mu, logvar = self.encode_forward(x)
        z = self.reparameterize(mu, logvar) if self.variational else mu
        return self.decode_forward(z, use_sigmoid=False), mu, logvar


class DenseLoss(nn.Module):
    """L1 reconstruction error (Baur et al. use L1), plus ``kl_weight`` times the KL divergence of the latent from
    N(0, I), averaged over latent units (0 for the AE)."""

    def __init__(self, kl_weight: float = 0.0) -> None:
        super().__init__()
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}.")
        self.kl_weight = kl_weight

    def forward(self, pred: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        reconstruction, mu, logvar = pred
        loss = F.l1_loss(reconstruction.float(), target.float())
        if self.kl_weight > 0:
            kl = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
            loss = loss + self.kl_weight * kl
        return loss


class ResidualDetector(nn.Module):
    """A reconstruction baseline as a detector (the bundle's ``network_def``): score map ``|x - x_hat|`` [B, 1, *S],
    averaged over channels, higher = more anomalous, as the ILTM detector's score map is."""

    def __init__(self, autoencoder: DenseAutoEncoder) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        with eval_except(self.autoencoder):
            reconstruction = self.autoencoder(image.float())[0]
        return (image.float() - reconstruction.float()).abs().mean(dim=1, keepdim=True)
