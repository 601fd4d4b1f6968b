"""Latent healing: re-draw the tokens the Transformer finds unlikely (Patel et al. 2023, §3.1; Pinaya et al. 2022).

A latent grid is flattened in raster order with BOS prepended, ``seq = [BOS, s_0, ..., s_{L-1}]``. One
teacher-forced pass gives every token's log-likelihood ``log p(s_i | s_<i)``; tokens with ``p < t`` are flagged,
and the flags stay fixed from that pass, as in the paper. Each healed sample re-draws the flagged tokens left to
right, each conditioned on the already healed prefix; unflagged tokens keep their value.

:func:`heal` makes the sequential work follow the flagged tokens, not the sequence (docs/README.md, "Benchmark"): the N
samplings of an image form one batch, the prefix before the first flagged token is computed once and its KV cache
expanded to N, each flagged token costs one cached step that also teacher-forces the unflagged run before it, and
nothing after the last flagged token touches the Transformer. :func:`heal_naive` is the prior implementations' path (the
whole prefix re-run for every flagged token), kept only as the reference for tests and the benchmark. Both draw their
random numbers in the same order (one ``multinomial`` call over ``[N, codes]`` per flagged token, left to right), so
with the same generator they give the same latents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils.ordering import Ordering
from torch import nn

from scripts.transformer import token_log_probs

__all__ = [
    "LatentSequencer",
    "flag_tokens",
    "heal",
    "heal_naive",
    "sample_codes",
    "token_log_likelihood",
]


class LatentSequencer:
    """Grid <-> sequence through MONAI's ``Ordering``, so training, flags and healing share one token order.

    Build it from the latent shape the VQ-VAE returns (``index_quantize(images).shape[1:]``), never a hard-coded one.
    """

    def __init__(self, grid_shape: Sequence[int], bos_id: int, ordering_type: str = "raster_scan") -> None:
        self.grid_shape = tuple(int(s) for s in grid_shape)
        self.bos_id = int(bos_id)
        ordering = Ordering(
            ordering_type=ordering_type, spatial_dims=len(self.grid_shape), dimensions=(1, *self.grid_shape)
        )
        self._order = torch.as_tensor(np.ascontiguousarray(ordering.get_sequence_ordering()), dtype=torch.long)
        self._revert = torch.as_tensor(np.ascontiguousarray(ordering.get_revert_sequence_ordering()), dtype=torch.long)

    @property
    def num_tokens(self) -> int:
        return len(self._order)

    def to_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        """[B, *grid] -> [B, L] in sequence order (works for any dtype: indices, log-likelihoods, flags)."""
        self._check_grid(grid)
        return grid.reshape(grid.shape[0], -1)[:, self._order.to(grid.device)]

    def to_sequence(self, grid: torch.Tensor) -> torch.Tensor:
        """[B, *grid] code indices -> [B, L+1] Transformer input with BOS at position 0."""
        tokens = self.to_tokens(grid).long()
        bos = torch.full((tokens.shape[0], 1), self.bos_id, dtype=torch.long, device=tokens.device)
        return torch.cat([bos, tokens], dim=1)

    def to_keep(self, masked: torch.Tensor) -> torch.Tensor:
        """[B, *grid] bool masked tokens -> [B, L+1] Transformer ``keep`` aligned with :meth:`to_sequence` (BOS kept)."""
        return F.pad(~self.to_tokens(masked.bool()), (1, 0), value=True)

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., L] values in sequence order -> [..., *grid]; a leading BOS ([..., L+1]) is dropped."""
        if tokens.shape[-1] == self.num_tokens + 1:
            tokens = tokens[..., 1:]
        if tokens.shape[-1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens (grid {self.grid_shape}), got {tokens.shape[-1]}.")
        return tokens[..., self._revert.to(tokens.device)].reshape(*tokens.shape[:-1], *self.grid_shape)

    def _check_grid(self, grid: torch.Tensor) -> None:
        if tuple(grid.shape[1:]) != self.grid_shape:
            raise ValueError(f"grid must be [B, *{self.grid_shape}], got {tuple(grid.shape)}.")


def token_log_likelihood(transformer: nn.Module, seq: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``log p(s_i | s_<i)`` of every token from one teacher-forced pass: [B, L+1] sequence -> [B, L]."""
    logits = transformer(seq[:, :-1], keep=None if keep is None else keep[:, :-1])
    log_probs = token_log_probs(logits, transformer.num_codes)
    return log_probs.gather(-1, seq[:, 1:, None]).squeeze(-1)


def flag_tokens(log_likelihood: torch.Tensor, threshold: float = 0.005) -> torch.Tensor:
    """Tokens to re-draw, ``p(s_i | s_<i) < t`` (the paper's resampling threshold), compared in log space."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"the resampling threshold is a probability in (0, 1], got {threshold}.")
    return log_likelihood < math.log(threshold)


def sample_codes(
    logits: torch.Tensor,
    num_codes: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One multinomial draw per row of [N, V] logits, over codebook entries only (never BOS): [N] long.

    All randomness of healing goes through here, one call per flagged token, so the cached and naive paths
    consume the generator identically.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use top_k=1 for greedy decoding), got {temperature}.")
    log_probs = token_log_probs(logits, num_codes)
    if temperature != 1.0:
        log_probs = log_probs / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}.")
        kth = log_probs.topk(min(top_k, num_codes), dim=-1).values[..., -1:]
        log_probs = log_probs.masked_fill(log_probs < kth, float("-inf"))
    return torch.multinomial(torch.softmax(log_probs, dim=-1), 1, generator=generator).squeeze(-1)


def _per_image(seq: torch.Tensor, flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept [L+1] / [1, L+1] sequences and [L] / [1, L] flags; return [1, L+1] and the sorted flagged positions."""
    seq = seq.reshape(1, -1) if seq.dim() == 1 else seq
    flags = flags.reshape(-1)
    if seq.shape[0] != 1:
        raise ValueError(f"heal takes one image ([L+1] or [1, L+1]); call it per image for {seq.shape[0]} images.")
    if flags.shape[0] != seq.shape[1] - 1:
        raise ValueError(f"flags must have one entry per token ({seq.shape[1] - 1}), got {flags.shape[0]}.")
    return seq, torch.nonzero(flags.to(torch.bool)).flatten().tolist()


@torch.no_grad()
def heal(
    transformer: nn.Module,
    seq: torch.Tensor,
    flags: torch.Tensor,
    num_samples: int = 60,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """N healed token sequences [N, L] of one image, KV-cached so that the cost follows the flagged tokens.

    Token ``j`` is predicted by the logits at sequence position ``j`` (input ``seq[:, :j+1]``). Flagged token
    ``f_k`` is drawn after one cached step that feeds ``seq[f_{k-1}+1 : f_k+1]``: the token just drawn at
    ``f_{k-1}`` followed by the unflagged run up to ``f_k``. Total work: ``f_1 + 1`` tokens once, then
    ``N * (f_K - f_1)`` tokens, the floor of the cost model in docs/README.md.

    Args:
        transformer: a :class:`~scripts.transformer.MaskedTransformer` (``num_codes``, ``new_cache``).
        seq: [L+1] or [1, L+1] sequence with BOS at position 0.
        flags: [L] or [1, L] bool, True = re-draw this token.
        num_samples: N, the healed samples per image (paper: 60).
        temperature, top_k: sampling options (``top_k=1`` is greedy).
        generator: torch generator on the Transformer's device, for reproducible draws.
    """
    seq, flagged = _per_image(seq, flags)
    healed = seq.expand(num_samples, -1).clone()  # [N, L+1]
    if not flagged:
        return healed[:, 1:]
    cache = transformer.new_cache(1)
    first = flagged[0]
    logits = transformer(seq[:, : first + 1], cache=cache, last_only=True)[:, -1]  # shared prefix, once
    cache = cache.expand(num_samples)
    logits = logits.expand(num_samples, -1)
    previous = first
    for position in flagged:
        if position != first:
            logits = transformer(healed[:, previous + 1 : position + 1], cache=cache, last_only=True)[:, -1]
        healed[:, position + 1] = sample_codes(logits, transformer.num_codes, temperature, top_k, generator)
        previous = position
    return healed[:, 1:]


@torch.no_grad()
def heal_naive(
    transformer: nn.Module,
    seq: torch.Tensor,
    flags: torch.Tensor,
    num_samples: int = 60,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reference for :func:`heal` (tests and benchmark only): re-runs the whole prefix for every flagged token."""
    seq, flagged = _per_image(seq, flags)
    healed = seq.expand(num_samples, -1).clone()
    for position in flagged:
        logits = transformer(healed[:, : position + 1], last_only=True)[:, -1]
        healed[:, position + 1] = sample_codes(logits, transformer.num_codes, temperature, top_k, generator)
    return healed[:, 1:]
