"""Masked decoder-only Transformer for ILTM (Patel et al., ICCV Workshops 2023).

The Transformer models the VQ-VAE's latent tokens autoregressively, p(s_i | s_<i). ILTM removes suspicious
tokens from training, so the model here takes a ``keep`` mask ([B, L] bool, True = the token is used) and makes
the removal exact:

- a masked token is never attended to (attention = causal AND key-keep),
- a masked *input* token is replaced by a learned ``[MASK]`` embedding, because otherwise its value would still
  reach the prediction of the next token through the residual stream at its own position,
- a masked *target* token does not enter the loss (:func:`masked_cross_entropy`).

BOS (position 0) is always kept, whatever ``keep`` says, so every attention row has at least one key (an empty
row would give NaN).

Healing re-draws flagged tokens one at a time; :class:`KVCache` lets it feed runs of unflagged tokens in chunks and
each flagged token as one step, without recomputing the prefix.

MONAI's ``DecoderOnlyTransformer`` cannot combine a padding-style mask with causal attention, hence this file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast(device: torch.device, enabled: bool, dtype: str = "float16"):
    """Mixed precision on CUDA only (CPU autocast would run bfloat16 matmuls slower than float32 here)."""
    return torch.autocast(device_type="cuda", dtype=AMP_DTYPES[dtype], enabled=bool(enabled) and device.type == "cuda")


__all__ = ["KVCache", "MaskedTransformer", "masked_cross_entropy", "next_token_loss", "token_log_probs"]


class KVCache:
    """Keys and values of the tokens consumed so far, so that each new token costs one token, not the prefix.

    Buffers are allocated once for ``max_seq_len`` tokens (on the first forward, in its dtype and device) and
    filled in place: a decoding step then only reads the cache instead of copying it. The cache is meant for
    inference (``torch.no_grad()``); in-place writes would invalidate the graph of earlier steps.
    Positions of new tokens continue from :attr:`length`.
    """

    def __init__(self, num_layers: int, batch_size: int, max_seq_len: int) -> None:
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.length = 0
        self._k: list[torch.Tensor | None] = [None] * num_layers  # each [B, H, max_seq_len, Dh]
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self._keep: torch.Tensor | None = None  # [B, max_seq_len]; None while every consumed token was kept

    @property
    def keys(self) -> list[torch.Tensor | None]:
        """Per-layer keys of the consumed tokens, [B, H, length, Dh] (None before the first forward)."""
        return [None if k is None else k[:, :, : self.length] for k in self._k]

    @property
    def values(self) -> list[torch.Tensor | None]:
        """Per-layer values of the consumed tokens, [B, H, length, Dh] (None before the first forward)."""
        return [None if v is None else v[:, :, : self.length] for v in self._v]

    def expand(self, n: int) -> KVCache:
        """Repeat each row ``n`` times (rows b*n .. b*n+n-1 copy row b): compute a shared prefix once, sample N ways.

        Meant for a batch-1 cache; a batch-B cache becomes batch B*n. The original cache is left untouched.
        """
        if n < 1:
            raise ValueError(f"expand needs n >= 1, got {n}.")
        out = KVCache(self.num_layers, self.batch_size * n, self.max_seq_len)
        out.length = self.length
        for layer in range(self.num_layers):
            for src, dst in ((self._k, out._k), (self._v, out._v)):
                if src[layer] is not None:
                    buf = src[layer]
                    dst[layer] = buf.new_empty((buf.shape[0] * n, *buf.shape[1:]))
                    dst[layer][:, :, : self.length] = buf[:, :, : self.length].repeat_interleave(n, dim=0)
        if self._keep is not None:
            out._keep = self._keep.repeat_interleave(n, dim=0)
        return out

    def record_keep(self, keep: torch.Tensor | None, chunk_len: int) -> torch.Tensor | None:
        """Store the chunk's keep flags; return the flags of all keys the chunk sees, [B, length + T], or None."""
        end = self.length + chunk_len
        if keep is None and self._keep is None:
            return None
        if self._keep is None:  # first masked chunk: every earlier token was kept
            self._keep = torch.ones(self.batch_size, self.max_seq_len, dtype=torch.bool, device=keep.device)
        self._keep[:, self.length : end] = True if keep is None else keep
        return self._keep[:, :end]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the chunk's keys/values after the prefix; return keys/values of prefix + chunk."""
        if self._k[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_seq_len, k.shape[3])
            self._k[layer], self._v[layer] = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.shape[2]
        self._k[layer][:, :, self.length : end] = k
        self._v[layer][:, :, self.length : end] = v
        return self._k[layer][:, :, :end], self._v[layer][:, :, :end]


class SelfAttention(nn.Module):
    """Multi-head self-attention, not causal by itself: the caller passes the causal and masked-token mask."""

    def __init__(self, embed_dim: int, num_heads: int, attn_dropout: float, resid_dropout: float, bias: bool) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.resid_drop = nn.Dropout(resid_dropout)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None = None,
        layer: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """[B, T, D] -> [B, T, D], or [B, 1, D] for the last position alone (``last_only``: every position still
        gives its key and value)."""
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2) for z in self.qkv(x).split(d, -1))
        if cache is not None:
            k, v = cache.append(layer, k, v)
        if last_only and t > 1:  # the last query sees every key: its row of the mask, and no causal triangle
            q, t, is_causal = q[:, :, -1:], 1, False
            attn_mask = None if attn_mask is None else attn_mask[..., -1:, :]
        # A boolean mask (True = may attend) still lets PyTorch pick the memory-efficient kernel on GPU;
        # is_causal without a mask allows flash attention.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=is_causal
        )
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, embed_dim: int, num_heads: int, attn_dropout: float, resid_dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(embed_dim, bias=bias)
        self.attn = SelfAttention(embed_dim, num_heads, attn_dropout, resid_dropout, bias)
        self.ln2 = nn.LayerNorm(embed_dim, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim, bias=bias),
            nn.GELU(),
            nn.Linear(4 * embed_dim, embed_dim, bias=bias),
            nn.Dropout(resid_dropout),
        )

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        layer: int,
        last_only: bool = False,
    ) -> torch.Tensor:
        y = self.attn(self.ln1(x), attn_mask, is_causal, cache, layer, last_only)
        x = (x[:, -1:] if last_only else x) + y
        return x + self.mlp(self.ln2(x))


class MaskedTransformer(nn.Module):
    """Decoder-only Transformer over latent tokens whose attention and input can exclude masked tokens.

    Args:
        num_tokens: vocabulary size = codebook size + 1; the last id (``bos_id`` = codebook size) is BOS.
        max_seq_len: longest input, i.e. the number of latent tokens (input = BOS + all but the last token).
        embed_dim, num_layers, num_heads: width, depth and heads.
        attn_dropout: dropout on attention weights (training only).
        resid_dropout: dropout on each residual branch's output.
        embed_dropout: dropout on token + position embeddings.
        use_mask_token: replace masked input tokens by a learned ``[MASK]`` embedding. With False, a masked token
            is still never attended to, so logits at *other* positions do not depend on it, but its value reaches
            the logits at its own position (which predict the next token) through the residual stream: masking is
            then not exact.
        bias: biases in Linear and LayerNorm layers.
    """

    def __init__(
        self,
        num_tokens: int,
        max_seq_len: int,
        embed_dim: int = 256,
        num_layers: int = 8,
        num_heads: int = 8,
        attn_dropout: float = 0.0,
        resid_dropout: float = 0.0,
        embed_dropout: float = 0.0,
        use_mask_token: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.settings = dict(  # what a checkpoint records to rebuild this network (scripts/checkpoint.py)
            num_tokens=num_tokens, max_seq_len=max_seq_len, embed_dim=embed_dim, num_layers=num_layers,
            num_heads=num_heads, attn_dropout=attn_dropout, resid_dropout=resid_dropout, embed_dropout=embed_dropout,
            use_mask_token=use_mask_token, bias=bias,
        )  # fmt: skip
        if num_tokens < 2:
            raise ValueError(f"num_tokens must be codebook size + 1 >= 2, got {num_tokens}.")
        self.num_tokens = num_tokens
        self.num_codes = num_tokens - 1
        self.bos_id = num_tokens - 1
        self.max_seq_len = max_seq_len
        self.num_layers = num_layers
        self.tok_emb = nn.Embedding(num_tokens, embed_dim)
        self.pos_emb = nn.Embedding(max_seq_len, embed_dim)
        self.mask_emb = nn.Parameter(torch.zeros(embed_dim)) if use_mask_token else None
        self.embed_drop = nn.Dropout(embed_dropout)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, attn_dropout, resid_dropout, bias) for _ in range(num_layers)
        )
        self.ln_f = nn.LayerNorm(embed_dim, bias=bias)
        self.head = nn.Linear(embed_dim, num_tokens, bias=False)  # not tied: masked tokens' rows must get no grad
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init; residual output projections scaled by 1/sqrt(2 * layers) so the residual stream stays O(1)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if self.mask_emb is not None:
            nn.init.normal_(self.mask_emb, mean=0.0, std=0.02)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.num_layers))

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty cache for incremental decoding of ``batch_size`` sequences."""
        return KVCache(self.num_layers, batch_size, self.max_seq_len)

    def forward(
        self,
        tokens: torch.Tensor,
        keep: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, L, num_tokens]; logits[:, i] predict the token after tokens[:, i].

        Args:
            tokens: [B, L] token ids, BOS at position 0 (or the next chunk when ``cache`` is given).
            keep: [B, L] bool, True = the token is used; None = all used. BOS (position 0) is always kept.
            cache: if given, ``tokens`` continue the cached sequence at position ``cache.length``: they attend to
                the whole (kept) prefix and causally within the chunk, and their keys/values are appended.
            last_only: logits [B, 1, num_tokens] of the last position only, as healing needs: the last block then
                runs its attention output and MLP for that position alone (the others only give keys and values).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tuple(tokens.shape)}.")
        b, t = tokens.shape
        start = 0 if cache is None else cache.length
        if start + t > self.max_seq_len:
            raise ValueError(f"{start} cached + {t} new tokens exceed max_seq_len={self.max_seq_len}.")
        if cache is not None and b != cache.batch_size:
            raise ValueError(f"tokens have batch size {b}, the cache {cache.batch_size}.")
        if keep is not None:
            if keep.shape != tokens.shape:
                raise ValueError(f"keep {tuple(keep.shape)} must have the shape of tokens {tuple(tokens.shape)}.")
            if keep.dtype != torch.bool:  # one polarity everywhere: refuse 0/1 masks of unknown meaning
                raise TypeError(f"keep must be a bool tensor (True = token used), got {keep.dtype}.")
            if start == 0:  # BOS is always kept, so no attention row is empty
                keep = torch.cat([keep.new_ones(b, 1), keep[:, 1:]], dim=1)

        x = self.tok_emb(tokens)
        if keep is not None and self.mask_emb is not None:
            x = torch.where(keep.unsqueeze(-1), x, self.mask_emb.to(x.dtype))
        x = x + self.pos_emb(torch.arange(start, start + t, device=tokens.device))
        x = self.embed_drop(x)

        attn_mask, is_causal = self._attention_mask(keep, t, cache, tokens.device)
        for layer, block in enumerate(self.blocks):
            x = block(x, attn_mask, is_causal, cache, layer, last_only and layer == self.num_layers - 1)
        if cache is not None:
            cache.length += t
        return self.head(self.ln_f(x))

    @staticmethod
    def _attention_mask(
        keep: torch.Tensor | None, t: int, cache: KVCache | None, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """(attn_mask, is_causal) for SDPA: query i may see key j iff j is not in its future and j is kept."""
        if cache is None:
            if keep is None:
                return None, True  # lets SDPA use its fused causal kernels
            causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
            return causal & keep[:, None, None, :], False  # [B, 1, T, T]
        start = cache.length
        key_keep = cache.record_keep(keep, t)  # [B, start + t] or None
        if key_keep is None and t == 1:
            return None, False  # a single new token may see everything cached
        # is_causal would align the triangle top-left; with a prefix the chunk's diagonal is offset by `start`.
        causal = (
            torch.arange(start + t, device=device)[None, :] <= torch.arange(start, start + t, device=device)[:, None]
        )
        if key_keep is None:
            return causal, False  # [T, start + T]
        return causal & key_keep[:, None, None, :], False  # [B, 1, T, start + T]


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy over kept targets only: masked (suspected anomalous) tokens must not be learned.

    A batch without any kept target returns 0 that still has a graph (so ``backward`` works), never NaN.
    """
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if keep is None:
        return F.cross_entropy(flat_logits, flat_targets)
    if keep.shape != targets.shape:
        raise ValueError(f"keep {tuple(keep.shape)} must have the shape of targets {tuple(targets.shape)}.")
    flat_keep = keep.reshape(-1).to(torch.bool)
    losses = F.cross_entropy(flat_logits, flat_targets, reduction="none")
    # where, not multiply: a non-finite loss at a masked target must not turn the sum into NaN.
    return torch.where(flat_keep, losses, torch.zeros_like(losses)).sum() / flat_keep.sum().clamp_min(1)


def next_token_loss(logits: torch.Tensor, seq: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Loss of the logits a model gave for inputs seq[:, :-1] ([B, L+1], BOS at 0) against targets seq[:, 1:],
    over kept targets only."""
    return masked_cross_entropy(logits, seq[:, 1:], None if keep is None else keep[:, 1:])


def token_log_probs(logits: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Log-probabilities over codebook entries only: BOS never follows, so it takes no probability mass."""
    codes = logits[..., :num_codes]
    return F.log_softmax(codes.to(torch.promote_types(codes.dtype, torch.float32)), dim=-1)  # fp16 -> fp32
