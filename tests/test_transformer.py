"""Tests that would catch a wrong mask in the masked Transformer: leaks, lost causality, a wrong cache, a wrong loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scripts.transformer import KVCache, MaskedTransformer, masked_cross_entropy, next_token_loss, token_log_probs

NUM_CODES = 11
L = 16


def model_loss(model: MaskedTransformer, seq: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The training loss as the Transformer stage computes it: inputs seq[:, :-1] with their keep flags."""
    return next_token_loss(model(seq[:, :-1], None if keep is None else keep[:, :-1]), seq, keep)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64, **kwargs) -> MaskedTransformer:
    torch.manual_seed(seed)
    args = dict(num_tokens=NUM_CODES + 1, max_seq_len=L, embed_dim=32, num_layers=2, num_heads=4)
    args.update(kwargs)
    return MaskedTransformer(**args).to(dtype).eval()


def make_tokens(batch: int = 3, length: int = L, seed: int = 1) -> torch.Tensor:
    """Input sequences: BOS then random codes."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, NUM_CODES, (batch, length), generator=g)
    tokens[:, 0] = NUM_CODES  # BOS
    return tokens


def make_keep(batch: int = 3, length: int = L, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, length, generator=g) > 0.3
    keep[:, 0] = True
    keep[0, 1:4] = False  # a run of masked tokens right after BOS
    return keep


def test_shapes_and_attributes() -> None:
    model = make_model()
    assert model.bos_id == NUM_CODES and model.num_codes == NUM_CODES and model.max_seq_len == L
    tokens = make_tokens()
    assert model(tokens).shape == (3, L, NUM_CODES + 1)
    assert model(tokens[:, :5], make_keep()[:, :5]).shape == (3, 5, NUM_CODES + 1)
    assert model.num_parameters() > 0
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.full((1, L + 1), NUM_CODES))
    with pytest.raises(TypeError, match="bool"):
        model(tokens, make_keep().long())


@pytest.mark.parametrize("use_mask_token", [True, False])
def test_masked_token_values_do_not_reach_kept_logits(use_mask_token: bool) -> None:
    """(a) Changing masked tokens' values leaves kept positions' logits unchanged (all logits with [MASK])."""
    model = make_model(use_mask_token=use_mask_token)
    tokens, keep = make_tokens(), make_keep()
    other = tokens.clone()
    other[~keep] = (tokens[~keep] + 1 + torch.randint(0, NUM_CODES - 1, tokens[~keep].shape)) % NUM_CODES
    assert (other[~keep] != tokens[~keep]).all()
    with torch.no_grad():
        a, b = model(tokens, keep), model(other, keep)
    assert torch.allclose(a[keep], b[keep], atol=1e-6, rtol=0)
    if use_mask_token:
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    else:  # documented leak: a masked token's value reaches the logits at its own position via the residual stream
        assert not torch.allclose(a[~keep], b[~keep], atol=1e-6, rtol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_causality(masked: bool) -> None:
    """(b) No logit at position <= i depends on tokens i+1.. (with and without a keep mask)."""
    model = make_model()
    tokens = make_tokens()
    keep = make_keep() if masked else None
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ref = model(tokens, keep)
        for i in range(L - 1):
            changed = tokens.clone()
            changed[:, i + 1 :] = (changed[:, i + 1 :] + torch.randint(1, NUM_CODES, (1,), generator=g)) % NUM_CODES
            out = model(changed, keep)
            assert torch.allclose(out[:, : i + 1], ref[:, : i + 1], atol=1e-10, rtol=0), i
            assert not torch.allclose(out[:, i + 1 :], ref[:, i + 1 :])  # the later positions do see the change


@pytest.mark.parametrize("use_mask_token", [True, False])
def test_no_gradient_reaches_masked_token_embeddings(use_mask_token: bool) -> None:
    """(c) Token ids that occur only at masked positions get exactly zero gradient on their embedding rows."""
    model = make_model(use_mask_token=use_mask_token)
    seq = torch.cat([make_tokens(length=L), torch.zeros(3, 1, dtype=torch.long)], dim=1)  # [B, L+1]
    seq[:, 1:] %= 8  # ids 0..7 everywhere...
    keep = torch.ones_like(seq, dtype=torch.bool)
    masked_pos = [(0, 2), (0, 3), (1, 5), (1, 16), (2, 9), (2, 10), (2, 11)]
    for i, (b, p) in enumerate(masked_pos):  # ...and ids 8, 9 only at masked positions (inputs and targets)
        seq[b, p], keep[b, p] = 8 + i % 2, False
    loss = model_loss(model, seq, keep)
    loss.backward()
    grad = model.tok_emb.weight.grad
    assert grad[:8].abs().sum(dim=1).gt(0).all()  # kept ids do get gradient
    if use_mask_token:
        assert torch.equal(grad[8:10], torch.zeros_like(grad[8:10]))
        assert model.mask_emb.grad.abs().sum() > 0
    else:  # documented leak without [MASK]: the masked input's own position predicts the next (kept) token
        assert grad[8:10].abs().sum() > 0


def test_kv_cache_matches_full_forward() -> None:
    """(d) Prefill a chunk, single steps, another chunk == one full forward."""
    model = make_model()
    tokens = make_tokens()
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(3)
        parts = [model(tokens[:, :5], cache=cache)]
        for i in range(5, 9):
            parts.append(model(tokens[:, i : i + 1], cache=cache))
        parts.append(model(tokens[:, 9:], cache=cache))
    assert cache.length == L
    assert cache.keys[0].shape == (3, 4, L, 8) and cache.values[-1].shape == (3, 4, L, 8)
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens[:, :1], cache=cache)
    with pytest.raises(ValueError, match="batch"):
        model(tokens[:2, :1], cache=model.new_cache(3))


def test_kv_cache_with_keep_matches_full_forward() -> None:
    model = make_model()
    tokens, keep = make_tokens(), make_keep()
    keep[:, 0] = False  # must be forced back to True in cached mode too
    with torch.no_grad():
        full = model(tokens, keep)
        cache = model.new_cache(3)
        parts = [model(tokens[:, :6], cache=cache)]  # no keep at first: the cache learns of masking later
        for i in range(6, 10):
            parts.append(model(tokens[:, i : i + 1], keep[:, i : i + 1], cache=cache))
        parts.append(model(tokens[:, 10:], keep[:, 10:], cache=cache))
        full_partly_masked = model(tokens, torch.cat([torch.ones_like(keep[:, :6]), keep[:, 6:]], dim=1))
    assert torch.allclose(torch.cat(parts, dim=1), full_partly_masked, atol=1e-5, rtol=0)
    with torch.no_grad():
        cache = model.new_cache(3)
        parts = [model(tokens[:, :7], keep[:, :7], cache=cache), model(tokens[:, 7:], keep[:, 7:], cache=cache)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_last_only_gives_the_last_logits_and_the_same_cache(masked: bool) -> None:
    """Healing's shortcut: the last block runs its attention output and MLP for the last position alone, yet every
    position's keys and values still reach the cache, so later chunks see the same prefix."""
    model = make_model()
    tokens, keep = make_tokens(), (make_keep() if masked else None)
    with torch.no_grad():
        full = model(tokens, keep)
        assert torch.allclose(model(tokens, keep, last_only=True), full[:, -1:], atol=1e-10, rtol=0)
        caches = model.new_cache(3), model.new_cache(3)
        chunks = [(0, 6), (6, 7), (7, 11), (11, L)]
        for a, b in chunks:
            part = None if keep is None else keep[:, a:b]
            plain = model(tokens[:, a:b], part, cache=caches[0])
            short = model(tokens[:, a:b], part, cache=caches[1], last_only=True)
            assert short.shape == (3, 1, NUM_CODES + 1)
            assert torch.allclose(short, plain[:, -1:], atol=1e-10, rtol=0)
    for layer in range(model.num_layers):
        assert torch.equal(caches[0].keys[layer], caches[1].keys[layer])
        assert torch.equal(caches[0].values[layer], caches[1].values[layer])


def test_kv_cache_expand_continues_each_row() -> None:
    """(d) A batch-1 prefix expanded to N rows, each continued differently, matches each row's full forward."""
    model = make_model()
    prefix, tails = make_tokens(batch=1)[:, :6], make_tokens(batch=4, seed=7)[:, 6:]
    with torch.no_grad():
        cache = model.new_cache(1)
        model(prefix, cache=cache)
        cache4 = cache.expand(4)
        assert cache4.batch_size == 4 and cache4.length == 6 and cache.batch_size == 1
        parts = [
            model(tails[:, :1], cache=cache4),
            model(tails[:, 1:2], cache=cache4),
            model(tails[:, 2:], cache=cache4),
        ]
        full = model(torch.cat([prefix.expand(4, -1), tails], dim=1))[:, 6:]
        # the original cache is untouched and can still be continued
        again = model(tails[:1], cache=cache)
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    assert torch.allclose(again, full[:1], atol=1e-5, rtol=0)
    assert isinstance(model.new_cache(2).expand(3), KVCache)


def test_kv_cache_expand_batch_rows_are_grouped() -> None:
    """A batch-B cache expands to B*n rows, rows b*n .. b*n+n-1 continuing row b."""
    model = make_model()
    tokens = make_tokens(batch=2)
    with torch.no_grad():
        cache = model.new_cache(2)
        model(tokens[:, :5], cache=cache)
        out = model(tokens[:, 5:].repeat_interleave(3, dim=0), cache=cache.expand(3))
        full = model(tokens)[:, 5:].repeat_interleave(3, dim=0)
    assert torch.allclose(out, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("keep_kind", ["none", "all"])
def test_loss_without_masking_is_plain_cross_entropy(keep_kind: str) -> None:
    """(e) With nothing masked, loss == torch cross-entropy; the mask path equals the fused causal path."""
    model = make_model()
    seq = torch.cat([make_tokens(), torch.randint(0, NUM_CODES, (3, 1))], dim=1)
    keep = None if keep_kind == "none" else torch.ones_like(seq, dtype=torch.bool)
    with torch.no_grad():
        logits = model(seq[:, :-1])
        if keep is not None:
            assert torch.allclose(model(seq[:, :-1], keep[:, :-1]), logits, atol=1e-10, rtol=0)
        expected = F.cross_entropy(logits.reshape(-1, NUM_CODES + 1), seq[:, 1:].reshape(-1))
        assert torch.allclose(model_loss(model, seq, keep), expected, atol=1e-10, rtol=0)


def test_masked_cross_entropy_averages_kept_targets_only() -> None:
    logits, targets = torch.randn(2, 5, 7, dtype=torch.float64), torch.randint(0, 7, (2, 5))
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    per_token = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), reduction="none").reshape(2, 5)
    assert torch.allclose(masked_cross_entropy(logits, targets, keep), per_token[keep].mean())
    bad = logits.clone()
    bad[~keep] = float("inf")  # non-finite logits at masked targets must not poison the mean
    assert torch.allclose(masked_cross_entropy(bad, targets, keep), per_token[keep].mean())


def test_no_kept_target_gives_finite_zero_loss() -> None:
    model = make_model()
    seq = torch.cat([make_tokens(), torch.randint(0, NUM_CODES, (3, 1))], dim=1)
    keep = torch.zeros_like(seq, dtype=torch.bool)
    loss = model_loss(model, seq, keep)
    assert torch.isfinite(loss) and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bos_keep_is_forced() -> None:
    """keep[:, 0] = False is overridden: otherwise the first attention rows would be empty (NaN)."""
    model = make_model()
    tokens, keep = make_tokens(), make_keep()
    keep[:, :4] = False
    dropped = keep.clone()
    dropped[:, 0] = False
    with torch.no_grad():
        out = model(tokens, dropped)
        forced = keep.clone()
        forced[:, 0] = True
        assert torch.isfinite(out).all()
        assert torch.equal(out, model(tokens, forced))
    assert not dropped[:, 0].any()  # the caller's tensor is not modified


def test_token_log_probs_exclude_bos() -> None:
    logits = torch.randn(2, 4, NUM_CODES + 1)
    lp = token_log_probs(logits, NUM_CODES)
    assert lp.shape == (2, 4, NUM_CODES)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 4), atol=1e-6)
    shifted = logits.clone()
    shifted[..., -1] += 100.0  # BOS logit has no effect
    assert torch.equal(token_log_probs(shifted, NUM_CODES), lp)
    assert token_log_probs(logits.half(), NUM_CODES).dtype == torch.float32
    assert token_log_probs(logits.double(), NUM_CODES).dtype == torch.float64


@pytest.mark.parametrize("option", ["attn_dropout", "resid_dropout", "embed_dropout"])
def test_dropout_active_in_training_only(option: str) -> None:
    model = make_model(**{option: 0.5})
    tokens, keep = make_tokens(), make_keep()
    with torch.no_grad():
        assert torch.equal(model(tokens, keep), model(tokens, keep))
        model.train()
        assert not torch.equal(model(tokens, keep), model(tokens, keep))


def test_tiny_model_overfits_fixed_sequences() -> None:
    """It trains: a tiny model memorises a few sequences, with part of the tokens masked."""
    model = make_model(dtype=torch.float32).train()
    g = torch.Generator().manual_seed(5)
    seq = torch.cat([torch.full((4, 1), NUM_CODES), torch.randint(0, NUM_CODES, (4, L), generator=g)], dim=1)
    seq[:, 1] = torch.arange(4)  # distinct first tokens, so every sequence is fully determined after one step
    keep = torch.rand(seq.shape, generator=g) > 0.2
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = model_loss(model, seq, keep)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
