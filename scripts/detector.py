"""The whole ILTM anomaly detector as one ``nn.Module`` (the bundle's ``network_def``).

Pipeline per image (Patel et al. 2023, §3.1; Pinaya et al. 2022): VQ-VAE latent -> token log-likelihoods from one
teacher-forced Transformer pass -> flags ``p < t`` -> N healed latents (:mod:`scripts.healing`) -> each decoded M
times with only the decoder's dropout active -> per-voxel KDE over the R = N*M reconstructions (:mod:`scripts.kde`).

``forward`` returns the score map ``-log density`` [B, 1, *S] (higher = more anomalous), for MONAI Label and
``verify_net_in_out``; :meth:`AnomalyDetector.infer` also returns the segmentation and the token-level maps the
ILTM iterations and the diagnostics (docs/README.md, "What makes ILTM work") need. ``resample=False`` is the ablation
"original latent, dropout decoding only": if the full method is no better, the Transformer is not what finds the
anomalies.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter
from torch import nn

from scripts.healing import LatentSequencer, flag_tokens, heal, token_log_likelihood
from scripts.kde import kde_log_density
from scripts.transformer import AMP_DTYPES, autocast
from scripts.vqvae import DropoutVQVAE, decoder_dropout_only, eval_except

__all__ = ["AnomalyDetector"]


def segment(score: torch.Tensor | np.ndarray, density_threshold: float) -> torch.Tensor | np.ndarray:
    """The detector's segmentation, the one place it is written: density below ``density_threshold``, i.e. the
    score ``-log density`` above ``-log(density_threshold)``. Tensors and numpy arrays alike."""
    return score > -math.log(density_threshold)


def place_flags(log_likelihood: torch.Tensor, flags: torch.Tensor, size: int) -> torch.Tensor:
    """Move each image's flags [B, *grid] onto the tokens of lowest ``size``-neighbourhood mean log-likelihood.

    The count per image is kept, so the resampling threshold keeps its meaning (how much of an image is re-drawn)
    and healing costs the same; only which tokens are re-drawn changes. Ties go to the earlier token.
    """
    pool = F.avg_pool2d if log_likelihood.dim() == 3 else F.avg_pool3d
    kernel = [min(size, n - 1 + n % 2) for n in log_likelihood.shape[1:]]  # odd, within a small grid's side
    padding = [k // 2 for k in kernel]
    smooth = pool(log_likelihood[:, None].float(), kernel, 1, padding, count_include_pad=False)[:, 0]
    rank = smooth.flatten(1).argsort(dim=1, stable=True).argsort(dim=1)
    return (rank < flags.flatten(1).sum(dim=1, keepdim=True)).view_as(flags)


def check_density_threshold(name: str, threshold: float, epsilon: float) -> None:
    """A KDE density never exceeds 1 / (epsilon * sqrt(2 pi)); a threshold at or above it marks every voxel anomalous,
    silently (ILTM would then mask every token). The usual cause: a threshold not converted to [0, 1] intensities."""
    ceiling = 1.0 / (epsilon * math.sqrt(2.0 * math.pi))
    if threshold >= ceiling:
        raise ValueError(
            f"{name} {threshold:g} is at or above the largest density the KDE can give, 1 / (epsilon * sqrt(2 pi)) = "
            f"{ceiling:.4g} for epsilon {epsilon:g}: every voxel would be anomalous. Densities are per unit of the "
            "[0, 1] intensities; state the paper's values in kde_units with their intensity_scale."
        )


@contextmanager
def _seeded_rng(device: torch.device, seed: int) -> Iterator[torch.Generator]:
    """Sampling generator plus a seeded global RNG for dropout, restored afterwards so callers' streams are untouched.

    Dropout cannot take a generator, so the global RNG of ``device`` is forked and seeded too (with a derived seed,
    so that dropout masks and token draws are not the same random stream).
    """
    cuda = device.type == "cuda"
    index = device.index if device.index is not None else (torch.cuda.current_device() if cuda else None)
    dropout_seed = (seed * 0x9E3779B1 + 0x7F4A7C15) % (2**63)
    with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
        torch.default_generator.manual_seed(dropout_seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(dropout_seed)
        yield torch.Generator(device=device).manual_seed(seed)


class AnomalyDetector(nn.Module):
    """VQ-VAE + masked Transformer + healing + dropout decoding + KDE; its ``state_dict`` is ``models/model.pt``.

    Args:
        vqvae: the first stage (:class:`~scripts.vqvae.DropoutVQVAE`), trained with its decoder dropout.
        transformer: the (ILTM-trained) :class:`~scripts.transformer.MaskedTransformer`.
        num_samples: N healed latents per image (paper: 60).
        num_decodes: M dropout decodes per latent (paper: 5), so R = N*M reconstructions.
        resample_threshold: t, tokens with ``p(s_i | s_<i) < t`` are re-drawn (paper: 0.005; ILTM lowers it).
        epsilon: KDE bandwidth floor in intensity units (0.05 on [0, 1]; the paper's 12.75 on 0-255).
        density_threshold: voxels with KDE density below it are anomalous (paper: 0.005). Not scale-free: it
            assumes the [0, 1] intensities the bundle's transforms produce.
        temperature, top_k: healing's sampling options.
        seed: every image is processed with generators seeded by it, so a map does not depend on the batch.
        kde_max_bytes: memory budget of the KDE's temporaries.
        decode_batch_size: latents decoded per VQ-VAE call.
        resample: False = ablation, the original latent decoded N*M times with dropout only.
        amp: autocast the Transformer and the decoder on CUDA (the KDE stays float32).
        amp_dtype: "float16" or "bfloat16".
        channel_reduction: how per-channel log-densities combine into one map (see :func:`scripts.kde.kde_log_density`).
        ordering_type: token order of MONAI's ``Ordering``; must match the Transformer's training.
        restrict_to_flags: the prior work's map restriction (Pinaya et al. 2022; the bundle's default for ILTM's masks,
            not for its maps, since 0.6.12: docs/README.md, "The method"): only voxels near flagged tokens get
            a KDE score; elsewhere the voxel is normal (the highest density a voxel can have, ``1 / (eps sqrt(2 pi))``)
            and its score ranks below every voxel near a flag (:meth:`below_flags`). "Near" = the upsampled flag map,
            Gaussian-smoothed with ``restrict_sigma`` voxels, above ``restrict_level`` times its maximum. The map
            then shows first what the Transformer resampled, not the VQ-VAE's error.
        restrict_sigma, restrict_level: see ``restrict_to_flags`` (prior work: 6 px; 0.05 x 0.075 of the maximum).
        flag_neighbourhood: 1 = the paper's rule, each token with ``p < t`` is re-drawn. An odd k > 1 (the bundle's
            configs: 3): the threshold still decides how many tokens of an image are re-drawn, but they are the ones
            whose k x k (x k) token neighbourhood has the lowest mean log-likelihood. An anomaly spans neighbouring
            tokens while a rare normal token stands alone, so the flags land on anomalies more often
            (:func:`place_flags`).
    """

    def __init__(
        self,
        vqvae: DropoutVQVAE,
        transformer: nn.Module,
        num_samples: int = 60,
        num_decodes: int = 5,
        resample_threshold: float = 0.005,
        epsilon: float = 0.05,
        density_threshold: float = 0.005,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
        kde_max_bytes: int = 256 * 2**20,
        decode_batch_size: int = 30,
        resample: bool = True,
        amp: bool = True,
        amp_dtype: str = "float16",
        channel_reduction: str = "mean",
        ordering_type: str = "raster_scan",
        restrict_to_flags: bool = False,
        restrict_sigma: float = 6.0,
        restrict_level: float = 0.05 * 0.075,
        flag_neighbourhood: int = 1,
    ) -> None:
        super().__init__()
        if amp_dtype not in AMP_DTYPES:
            raise ValueError(f"amp_dtype must be one of {sorted(AMP_DTYPES)}, got {amp_dtype!r}.")
        if num_samples < 1 or num_decodes < 1 or decode_batch_size < 1:
            raise ValueError("num_samples, num_decodes and decode_batch_size must be >= 1.")
        if density_threshold <= 0:
            raise ValueError(f"density_threshold must be > 0, got {density_threshold}.")
        check_density_threshold("density_threshold", density_threshold, epsilon)
        for name, flag in (("resample", resample), ("amp", amp), ("restrict_to_flags", restrict_to_flags)):
            if not isinstance(flag, bool):  # `--restrict_to_flags false` arrives as the (true) string "false"
                raise TypeError(f"{name} must be True or False (capitalised on the command line), got {flag!r}.")
        self.vqvae = vqvae
        self.transformer = transformer
        self.num_samples = num_samples
        self.num_decodes = num_decodes
        self.resample_threshold = resample_threshold
        self.epsilon = epsilon
        self.density_threshold = density_threshold
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self.kde_max_bytes = kde_max_bytes
        self.decode_batch_size = decode_batch_size
        self.resample = resample
        self.amp = amp
        self.amp_dtype = amp_dtype
        self.channel_reduction = channel_reduction
        self.ordering_type = ordering_type
        self.restrict_to_flags = restrict_to_flags
        self.restrict_sigma = restrict_sigma
        self.restrict_level = restrict_level
        if type(flag_neighbourhood) is not int or flag_neighbourhood < 1 or flag_neighbourhood % 2 == 0:
            raise ValueError(f"flag_neighbourhood must be an odd number of tokens >= 1, got {flag_neighbourhood!r}.")
        self.flag_neighbourhood = flag_neighbourhood
        self._sequencers: dict[tuple[int, ...], LatentSequencer] = {}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Score map ``-log density`` [B, 1, *S]: higher = more anomalous."""
        return self.infer(image)["score"]

    def sequencer(self, grid_shape: tuple[int, ...]) -> LatentSequencer:
        """The grid <-> sequence mapping for a latent shape (taken from the VQ-VAE's output, cached)."""
        key = tuple(grid_shape)
        if key not in self._sequencers:
            self._sequencers[key] = LatentSequencer(key, self.transformer.bos_id, self.ordering_type)
        return self._sequencers[key]

    @torch.no_grad()
    def infer(
        self,
        image: torch.Tensor,
        resample: bool | None = None,
        resample_threshold: float | None = None,
        num_samples: int | None = None,
        num_decodes: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Anomaly maps of a batch [B, C, *S] (device taken from it).

        Args:
            resample, resample_threshold, num_samples, num_decodes: per-call overrides (the ablation; ILTM's mask
                passes, which use their own threshold schedule and sample counts).

        Returns:
            ``score`` [B,1,*S] float (-log density; far from flags, :meth:`below_flags`); ``unrestricted_score`` and
            ``restricted_score``, the map without and with ``restrict_to_flags`` whatever its value (equal without
            resampling); ``log_density`` [B,1,*S] (restricted: the highest density far from flags); ``segmentation``
            [B,1,*S] bool
            (density < ``density_threshold``); ``token_log_likelihood`` and ``flags`` [B,1,*S] (token maps
            upsampled nearest); ``latent_log_likelihood`` and ``latent_flags`` [B, *grid]; ``num_flagged`` [B] long.
        """
        resample = self.resample if resample is None else resample
        threshold = self.resample_threshold if resample_threshold is None else resample_threshold
        counts = tuple(
            own if n is None else n for n, own in ((num_samples, self.num_samples), (num_decodes, self.num_decodes))
        )
        if min(counts) < 1:
            raise ValueError(f"num_samples and num_decodes must be >= 1, got {counts}.")
        image = image.to(next(self.vqvae.parameters()).dtype)
        with eval_except(self.transformer), decoder_dropout_only(self.vqvae):
            indices = self.vqvae.index_quantize(image)  # encoder + quantiser, float32: the latent is exact
            sequencer = self.sequencer(tuple(indices.shape[1:]))
            seq = sequencer.to_sequence(indices)
            with self._autocast(image.device):
                log_likelihood = token_log_likelihood(self.transformer, seq).float()
            latent_ll = sequencer.to_grid(log_likelihood)
            latent_flags = sequencer.to_grid(flag_tokens(log_likelihood, threshold))
            if self.flag_neighbourhood > 1:
                latent_flags = place_flags(latent_ll, latent_flags, self.flag_neighbourhood)
            flags = sequencer.to_tokens(latent_flags)
            log_density = torch.stack(
                [
                    self._image_log_density(image[b], seq[b], flags[b], sequencer, resample, *counts)
                    for b in range(len(image))
                ]
            )
        spatial = tuple(image.shape[2:])
        flag_map = self._upsample(latent_flags, spatial) > 0.5
        unrestricted = restricted = -log_density
        if resample:  # both maps, whichever the detector serves: ILTM's masks and its checks read the other too
            near = self.near_flags(flag_map)
            restricted = torch.where(near, unrestricted, self.below_flags(unrestricted))
            if self.restrict_to_flags:
                log_density = torch.where(near, log_density, self.max_log_density)
        return {
            "score": restricted if resample and self.restrict_to_flags else unrestricted,
            "unrestricted_score": unrestricted,
            "restricted_score": restricted,
            "log_density": log_density,
            "segmentation": segment(-log_density, self.density_threshold),
            "token_log_likelihood": self._upsample(latent_ll, spatial),
            "flags": flag_map,
            "latent_log_likelihood": latent_ll,
            "latent_flags": latent_flags,
            "num_flagged": flags.sum(dim=1),
        }

    @property
    def max_log_density(self) -> float:
        """The highest log-density the KDE can give: every reconstruction equal to the voxel, bandwidth ``eps``."""
        return -math.log(self.epsilon * math.sqrt(2.0 * math.pi))

    @property
    def lowest_score(self) -> float:
        """The most normal score a map can hold (what a margin the detector never saw is filled with)."""
        return -self.max_log_density - (1.0 if self.resample and self.restrict_to_flags else 0.0)

    def below_flags(self, score: torch.Tensor) -> torch.Tensor:
        """Scores of voxels away from every flag (``restrict_to_flags``): below the lowest score a KDE can give, so
        below every voxel near a flag, but in the order of their own score. Where nothing is flagged the map then still
        ranks voxels and images (all one value, it would find nothing), and no such voxel is ever segmented."""
        excess = (score + self.max_log_density).clamp(min=0.0)  # from 0: `lowest_score` is the floor
        return -self.max_log_density - 1.0 / (1.0 + excess.log1p())  # log: large excesses stay apart in float32

    def near_flags(self, flag_map: torch.Tensor) -> torch.Tensor:
        """[B, 1, *S] bool: voxels within the smoothed reach of a flagged token (``restrict_to_flags``)."""
        smooth = GaussianFilter(flag_map.dim() - 2, self.restrict_sigma).to(flag_map.device)
        weight = smooth(flag_map.float())
        peak = weight.flatten(1).amax(dim=1).view(-1, *[1] * (weight.dim() - 1))
        return (weight > self.restrict_level * peak) & (peak > 0)

    def _image_log_density(
        self,
        image: torch.Tensor,
        seq: torch.Tensor,
        flags: torch.Tensor,
        sequencer: LatentSequencer,
        resample: bool,
        num_samples: int,
        num_decodes: int,
    ) -> torch.Tensor:
        """One image [C, *S] -> KDE log-density [1, *S] (or [C, *S] with ``channel_reduction="none"``)."""
        with _seeded_rng(image.device, self.seed) as generator:
            if resample:
                with self._autocast(image.device):
                    tokens = heal(self.transformer, seq, flags, num_samples, self.temperature, self.top_k, generator)
            else:
                tokens = seq[1:].expand(num_samples, -1)
            reconstructions = self._decode(sequencer.to_grid(tokens), num_decodes, tuple(image.shape))
        return kde_log_density(
            image, reconstructions, self.epsilon, self.kde_max_bytes, self.channel_reduction, torch.float32
        )

    def _decode(self, latents: torch.Tensor, num_decodes: int, image_shape: tuple[int, ...]) -> torch.Tensor:
        """N latents [N, *grid] -> R = N*M reconstructions [R, C, *S] float32 (each latent's M decodes adjacent).

        Decoded in batches of `decode_batch_size` reconstructions, the dropout drawing the same masks in the same
        order as decoding all R at once would. What the M decodes of a latent share (everything before the dropout,
        `decode_shared`) is computed once per distinct latent: healed latents often repeat, and the ablation's are
        all one. The last layer then gives all decodes of a latent in one pass (`decode_many`).
        """
        distinct, which = torch.unique(latents.flatten(1), dim=0, return_inverse=True)
        distinct = distinct.view(-1, *latents.shape[1:])
        rows = which.repeat_interleave(num_decodes)  # reconstruction -> distinct latent
        out = torch.empty((len(rows), *image_shape), dtype=torch.float32, device=latents.device)
        kept: dict[int, torch.Tensor] = {}  # per distinct latent, for the next batch only (its decodes may straddle)
        for start in range(0, len(rows), self.decode_batch_size):
            ids = rows[start : start + self.decode_batch_size]
            needed = sorted(set(ids.tolist()))
            missing = [i for i in needed if i not in kept]
            with self._autocast(latents.device):
                if missing:
                    kept.update(zip(missing, self.vqvae.decode_shared(distinct[missing])))
                local = torch.searchsorted(torch.tensor(needed, device=ids.device), ids)
                decoded = self.vqvae.decode_many([kept[i] for i in needed], local)
            kept = {i: kept[i] for i in needed}
            if tuple(decoded.shape[1:]) != image_shape:
                raise ValueError(f"decoded shape {tuple(decoded.shape[1:])} differs from the image's {image_shape}.")
            out[start : start + len(ids)] = decoded
        return out

    def _autocast(self, device: torch.device):
        return autocast(device, self.amp, self.amp_dtype)

    @staticmethod
    def _upsample(grid: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
        """Token-grid map [B, *grid] -> [B, 1, *S], nearest: each voxel shows its token's value."""
        return F.interpolate(grid[:, None].float(), size=spatial, mode="nearest")
