"""First stage: MONAI's VQ-VAE with explicit decoder dropout, its loss, and the pieces the ignite engines need.

ILTM only works when the VQ-VAE reconstructs what it is shown, anomalies included (docs/README.md, "What makes
ILTM work"): the KDE inferer decodes every healed latent several times with the decoder's dropout on, so that
dropout is part of the trained model, channel-wise and right before the last decoder layer (Patel et al. 2023, §3.1).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from monai.losses import JukeboxLoss
from monai.networks.blocks import Convolution
from monai.networks.nets import VQVAE
from torch import nn

from scripts import distributed

CONV_FUNCTIONS = {
    nn.Conv2d: F.conv2d,
    nn.Conv3d: F.conv3d,
    nn.ConvTranspose2d: F.conv_transpose2d,
    nn.ConvTranspose3d: F.conv_transpose3d,
}


class DropoutVQVAE(VQVAE):
    """`monai.networks.nets.VQVAE` plus one channel-wise dropout before the decoder's last layer.

    MONAI's own `dropout` argument acts in the encoder as well; here the encoder stays deterministic so that a
    latent is a function of the image, and only `decoder_dropout` makes reconstructions vary.
    """

    def __init__(
        self, *args, decoder_dropout: float = 0.05, decay: float = 0.99, dead_code_threshold: float = 1.0, **kwargs
    ) -> None:
        try:
            super().__init__(*args, decay=decay, **kwargs)
        except ValueError as e:  # MONAI's words name one argument; the cause is usually a mix of two configs
            given = inspect.signature(VQVAE).bind_partial(*args, **kwargs).arguments
            levels = {k: given[k] for k in ("channels", "num_res_channels", "downsample_parameters") if k in given}
            raise ValueError(
                f"vqvae_def: MONAI's VQVAE refuses these settings ({e}): {levels}. Their numbers of levels must agree. "
                "A checkpoint given with configs/inference.yaml supplies its recorded value of every setting that no "
                "preset or command-line value sets, so a preset other than the one it was trained with mixes two "
                "networks: use configs/inference.yaml alone, or the preset the checkpoint was trained with."
            ) from None  # the command line shows the innermost cause: this one, which quotes MONAI's
        # what a checkpoint records to rebuild this network (scripts/checkpoint.py)
        self.settings = {
            **inspect.signature(VQVAE).bind_partial(*args, **kwargs).arguments,
            "decoder_dropout": decoder_dropout,
            "decay": decay,
        }
        self.dead_code_threshold = dead_code_threshold
        self.register_buffer("codebook_initialised", torch.tensor(False))
        dropout_type = nn.Dropout2d if self.spatial_dims == 2 else nn.Dropout3d
        self.decoder_dropout = dropout_type(p=decoder_dropout)
        blocks = list(self.decoder.blocks)
        last_conv = max(i for i, block in enumerate(blocks) if isinstance(block, Convolution))
        blocks.insert(last_conv, self.decoder_dropout)
        self.decoder.blocks = nn.ModuleList(blocks)
        self.dropout_at = last_conv  # decoder blocks before it are what the dropout decodes of one latent share

    def quantize(self, encodings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            self._maintain_codebook(encodings)
        return super().quantize(encodings)

    @torch.no_grad()
    def _maintain_codebook(self, encodings: torch.Tensor) -> None:
        """Data-dependent codebook initialisation and dead-code restarts (Dhariwal et al. 2020, Jukebox).

        With MONAI's random-normal codebook the EMA quantiser can collapse onto one or a few codes (seen here: one
        code for a whole texture set), and a collapsed codebook cannot reproduce anomalies. So the codebook starts
        from encoder outputs, and codes whose EMA usage falls below `dead_code_threshold` restart at random encoder
        outputs of the current batch.
        """
        quantizer = self.quantizer.quantizer
        flat = encodings.detach().float().movedim(1, -1).reshape(-1, self.embedding_dim)
        if not bool(self.codebook_initialised):
            dead = torch.ones(self.num_embeddings, dtype=torch.bool, device=flat.device)
            self.codebook_initialised.fill_(True)
        else:
            dead = quantizer.ema_cluster_size < self.dead_code_threshold
        if dead.any():  # the same on every rank: MONAI's EMA quantiser all-reduces its statistics under DDP
            picks = flat[torch.randint(len(flat), (int(dead.sum()),), device=flat.device)]
            quantizer.embedding.weight.data[dead] = picks
            quantizer.ema_w.data[dead] = picks
            quantizer.ema_cluster_size.data[dead] = 1.0
            # each rank picked from its own batch: rank 0's picks everywhere, so the codebooks stay identical
            distributed.broadcast_([quantizer.embedding.weight.data, quantizer.ema_w.data])

    def decode_shared(self, embedding_indices: torch.Tensor) -> torch.Tensor:
        """Token grids -> the decoder's features just before its dropout: the same for all M dropout decodes of a
        latent, so computed once per latent (the rest is `decode_dropout`).

        Channels-last: oneDNN's convolutions run faster in it (`scripts.benchmark`, docs/README.md "Benchmark"), and
        the per-channel responses it yields are laid out for :meth:`decode_responses`' weighted sums."""
        x = self.quantizer.embed(embedding_indices)
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        for block in self.decoder.blocks[: self.dropout_at]:
            x = block(x)
        return x

    def decode_dropout(self, shared: torch.Tensor) -> torch.Tensor:
        """`decode_shared`'s features -> images: the dropout and the decoder's last layer, what differs per decode."""
        for block in self.decoder.blocks[self.dropout_at :]:
            shared = block(shared)
        return shared

    def _last_conv(self) -> nn.Module | None:
        """The decoder's last layer when it is a bare, ungrouped (transposed) convolution, else None."""
        blocks = self.decoder.blocks[self.dropout_at + 1 :]
        conv = getattr(blocks[0], "conv", None) if len(blocks) == 1 else None
        plain = len(list(blocks[0].children())) == 1 if conv is not None else False
        bare = type(conv) in CONV_FUNCTIONS and conv.groups == 1 and conv.padding_mode == "zeros"
        return conv if plain and bare else None

    def decode_many(self, shared: Sequence[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """Images [B, C_out, *S] of B dropout decodes; decode b is of the latent whose `decode_shared` features
        ([C, *s]) are ``shared[rows[b]]``.

        The dropout noise is drawn as `nn.Dropout2d/3d` draws it for a batch of B (one Bernoulli tensor [B, C, 1..]
        from the global RNG), so with the same seed the images equal :meth:`decode_dropout`'s up to rounding. A
        convolution is linear in its input channels and the dropout scales whole channels, so the decodes of one
        latent are one convolution of its features whose weights carry each decode's noise: C_out outputs per
        decode, instead of one pass of the layer per decode (docs/README.md, "Benchmark").
        """
        conv, drop, first = self._last_conv(), self.decoder_dropout, shared[0]
        if conv is None:  # not a bare convolution: the layer itself, once per decode
            return self.decode_dropout(torch.stack([shared[i] for i in rows.tolist()]))
        b, c_in, dims = len(rows), first.shape[0], first.dim() - 1
        noise = torch.ones((b, c_in), dtype=first.dtype, device=first.device)
        if drop.training and drop.p > 0:
            noise = first.new_empty((b, c_in) + (1,) * dims).bernoulli_(1 - drop.p).div_(1 - drop.p).view(b, c_in)
        weight, kernel, out = conv.weight.to(first.dtype), conv.weight.shape[2:], None
        for i in rows.unique().tolist():
            at = (rows == i).nonzero().flatten()
            z = noise[at]  # [m, C_in]
            if conv.transposed:  # weight [C_in, C_out, *k] -> [C_in, m * C_out, *k]
                w = (weight[:, None] * z.T.reshape(c_in, len(at), 1, *[1] * dims)).reshape(c_in, -1, *kernel)
                args = (conv.stride, conv.padding, conv.output_padding, 1, conv.dilation)
            else:  # weight [C_out, C_in, *k] -> [m * C_out, C_in, *k]
                w = (weight[None] * z.reshape(len(at), 1, c_in, *[1] * dims)).reshape(-1, c_in, *kernel)
                args = (conv.stride, conv.padding, conv.dilation)
            y = CONV_FUNCTIONS[type(conv)](shared[i][None], w, None, *args)
            y = y.view(len(at), conv.out_channels, *y.shape[2:])
            out = y.new_empty((b, *y.shape[1:])) if out is None else out
            out[at] = y
        if conv.bias is not None:
            out += conv.bias.to(out.dtype).view(1, -1, *[1] * dims)
        return out


@contextmanager
def eval_except(module: nn.Module, *active: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode but for `active` submodules, then every submodule's own mode back: unlike MONAI's
    `eval_mode`, a mixed state (a trainer calling mid-training, some blocks frozen) is restored exactly."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    for m in active:
        m.train()
    try:
        yield module
    finally:
        for m, mode in modes.items():
            m.train(mode)


def decoder_dropout_only(vqvae: DropoutVQVAE):
    """Everything in eval mode except the decoder's dropout, as the KDE inferer requires; restores the old modes."""
    return eval_except(vqvae, vqvae.decoder_dropout)


class VQVAELoss(nn.Module):
    """Reconstruction (L1 by default) + quantisation (commitment) loss, for `SupervisedTrainer(loss_function=...)`.

    The trainer passes the network output `(reconstruction, quantisation_loss)` as `pred` and the image as target.
    `frequency_weight` > 0 adds MONAI's `JukeboxLoss` (spectral magnitude), which sharpens textures. A perceptual
    term is not offered: MONAI's `PerceptualLoss` needs pretrained weights downloaded at run time.
    """

    def __init__(
        self,
        reconstruction: str = "l1",
        quantisation_weight: float = 1.0,
        frequency_weight: float = 0.0,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        losses = {"l1": nn.L1Loss(), "l2": nn.MSELoss()}
        if reconstruction not in losses:
            raise ValueError(f"reconstruction loss must be one of {sorted(losses)}, got {reconstruction!r}")
        self.reconstruction = losses[reconstruction]
        self.quantisation_weight, self.frequency_weight = quantisation_weight, frequency_weight
        self.frequency = JukeboxLoss(spatial_dims=spatial_dims) if frequency_weight > 0 else None

    def forward(self, pred: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        reconstruction, quantisation_loss = pred
        reconstruction, target = reconstruction.float(), target.float()
        loss = self.reconstruction(reconstruction, target) + self.quantisation_weight * quantisation_loss
        if self.frequency is not None:
            loss = loss + self.frequency_weight * self.frequency(reconstruction, target)
        return loss


class ReconstructionInferer:
    """MONAI-style inferer returning only the reconstruction, so evaluators and handlers see an image as `pred`."""

    def __call__(self, inputs: torch.Tensor, network: DropoutVQVAE, *args, **kwargs) -> torch.Tensor:
        return network(inputs)[0]


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> tuple[int, float]:
    """Number of codes used and the perplexity of their distribution: a collapsed codebook cannot be faithful."""
    counts = torch.bincount(indices.flatten().long(), minlength=codebook_size).double()
    probs = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())
    return int((counts > 0).sum()), float(perplexity)


def prepare_reconstruction_batch(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """`prepare_batch` for the engines: the target of an autoencoder is its input; masks stay in the batch."""
    image = batchdata["image"].to(device=device, non_blocking=non_blocking)
    return image, image


FIDELITY_BINS = 32  # intensity bins over [0, 1], the bundle's scale


@torch.no_grad()
def error_tally(image: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per intensity bin of the image: L1 sum and voxel count inside the anomalies (`mask`), then outside them
    [4, FIDELITY_BINS]. Tallies of batches (and ranks) add up; :func:`fidelity` reads them."""
    error = (pred.float() - image.float()).abs().mean(dim=1, keepdim=True).cpu().double()
    level = image.float().mean(dim=1, keepdim=True).clamp(0, 1).mul(FIDELITY_BINS).long().clamp_max(FIDELITY_BINS - 1)
    level, mask = level.cpu(), mask.cpu() > 0
    rows = [torch.bincount(level[region], weights, minlength=FIDELITY_BINS).double()
            for region in (mask, ~mask) for weights in (error[region], None)]  # fmt: skip
    return torch.stack(rows)


def fidelity(tally: torch.Tensor, min_count: int = 10) -> dict[str, float]:
    """L1 inside the anomalies, outside them, and ``l1_matched``: outside them, weighted by intensity bin as the
    anomalous voxels are (a bin with fewer than `min_count` normal voxels takes the nearest one with enough).

    ``l1_matched`` is what a reconstruction that treats anomalies like normal tissue of the same brightness would err
    inside them. Noise that grows with intensity (PET's) and a background of air make bright anomalies' error large
    for any faithful reconstruction; only the error beyond that of equally bright normal tissue is the first stage's.
    """
    anomaly_sum, anomaly_count, normal_sum, normal_count = tally
    out = {}
    if anomaly_count.sum():
        out["l1_anomaly"] = float(anomaly_sum.sum() / anomaly_count.sum())
    if normal_count.sum():
        out["l1_normal"] = float(normal_sum.sum() / normal_count.sum())
    enough = (normal_count >= min_count).nonzero().flatten()
    if anomaly_count.sum() and len(enough):
        nearest = enough[(torch.arange(len(normal_count))[:, None] - enough[None]).abs().argmin(dim=1)]
        normal_mean = normal_sum[nearest] / normal_count[nearest]
        out["l1_matched"] = float((anomaly_count * normal_mean).sum() / anomaly_count.sum())
    return out


def fidelity_ratios(l1: Mapping[str, float | None]) -> dict[str, float]:
    """``l1_ratio`` (inside / outside the anomalies) and ``l1_ratio_matched`` (inside / intensity-matched normal)
    from :func:`fidelity`'s numbers, each where its denominator is positive."""
    out = {}
    for ratio, against in (("l1_ratio", "l1_normal"), ("l1_ratio_matched", "l1_matched")):
        if l1.get("l1_anomaly") is not None and (l1.get(against) or 0) > 0:
            out[ratio] = l1["l1_anomaly"] / l1[against]
    return out


class ReconstructionStats:
    """Validation handler: L1 error inside and outside the ground-truth anomalies (when masks exist), also against
    normal voxels of the same intensities (:func:`fidelity`), and codebook use.

    The error inside anomalies is what ILTM depends on: a VQ-VAE that cannot reproduce anomalies makes the anomaly
    map its own reconstruction error, and the Transformer (and so ILTM) then changes nothing (docs/README.md).
    Attach before `StatsHandler` so the numbers are in `engine.state.metrics` when it prints.
    """

    def __init__(self, prefix: str = "val") -> None:
        self.prefix = prefix

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine) -> None:
        self.tally = torch.zeros(4, FIDELITY_BINS, dtype=torch.float64)
        self.codes: list[torch.Tensor] = []

    @torch.no_grad()
    def _update(self, engine) -> None:
        image, pred = engine.state.output["image"], engine.state.output["pred"]
        mask = engine.state.batch.get("label") if isinstance(engine.state.batch, dict) else None
        if mask is not None:
            self.tally += error_tally(image, pred, mask)
        # ITERATION_COMPLETED comes after the evaluator has put the network back in training mode, where quantising
        # would move the EMA codebook (and restart codes) with validation images: quantise in eval mode
        with eval_except(engine.network):
            self.codes.append(engine.network.index_quantize(image).cpu())

    def _complete(self, engine) -> None:
        # every rank's shard of the validation images (one part in a single process)
        parts = distributed.gather((self.tally, torch.cat([c.flatten() for c in self.codes])))
        for name, value in fidelity(sum(p[0] for p in parts)).items():
            engine.state.metrics[f"{self.prefix}_{name}"] = value
        used, perplexity = codebook_usage(torch.cat([p[1] for p in parts]), engine.network.num_embeddings)
        engine.state.metrics[f"{self.prefix}_codes_used"] = used
        engine.state.metrics[f"{self.prefix}_perplexity"] = perplexity
