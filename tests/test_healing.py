"""Healing must change only flagged tokens, never emit BOS, and the KV-cached path must equal the naive reference."""

from __future__ import annotations

import math

import pytest
import torch

from scripts.healing import (
    LatentSequencer,
    flag_tokens,
    heal,
    heal_naive,
    sample_codes,
    token_log_likelihood,
)
from scripts.transformer import MaskedTransformer, token_log_probs

NUM_CODES = 9
GRID = (4, 5)
L = GRID[0] * GRID[1]


pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> MaskedTransformer:
    torch.manual_seed(seed)
    model = MaskedTransformer(num_tokens=NUM_CODES + 1, max_seq_len=L, embed_dim=32, num_layers=2, num_heads=4)
    with torch.no_grad():  # sharper than the init so that distributions are far from uniform
        model.head.weight.mul_(20)
    return model.to(dtype).eval()


def make_seq(batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grid = torch.randint(0, NUM_CODES, (batch, *GRID), generator=g)
    return LatentSequencer(GRID, NUM_CODES).to_sequence(grid)


def flags_at(*positions: int) -> torch.Tensor:
    flags = torch.zeros(L, dtype=torch.bool)
    flags[list(positions)] = True
    return flags


FLAG_SETS = [(0,), (L - 1,), (0, 1, 2), (3, 4, 9, 10, 11, 17), (0, 7, L - 1), tuple(range(L))]


def test_sequencer_round_trip_and_raster_order() -> None:
    seq_maker = LatentSequencer((2, 3, 4), bos_id=99)
    grid = torch.arange(24).reshape(1, 2, 3, 4)
    seq = seq_maker.to_sequence(grid)
    assert seq.shape == (1, 25) and seq[0, 0] == 99
    assert torch.equal(seq[0, 1:], torch.arange(24))  # raster order = row-major flattening
    assert torch.equal(seq_maker.to_grid(seq), grid)
    assert torch.equal(seq_maker.to_grid(seq[:, 1:].float()), grid.float())
    keep = seq_maker.to_keep(grid % 5 == 0)  # aligned with the sequence: BOS kept, then each token's own entry
    assert keep.shape == seq.shape and keep[0, 0] and torch.equal(keep[0, 1:], seq[0, 1:] % 5 != 0)
    with pytest.raises(ValueError):
        seq_maker.to_sequence(torch.zeros(1, 3, 2, 4, dtype=torch.long))


def test_token_log_likelihood_is_teacher_forced_next_token() -> None:
    model, seq = make_model(), make_seq()
    ll = token_log_likelihood(model, seq)
    assert ll.shape == (2, L)
    log_probs = token_log_probs(model(seq[:, :-1]), NUM_CODES)
    for j in (0, 5, L - 1):
        torch.testing.assert_close(ll[:, j], log_probs[torch.arange(2), j, seq[:, j + 1]])
    flags = flag_tokens(ll, 0.05)
    assert torch.equal(flags, ll.exp() < 0.05)
    with pytest.raises(ValueError):
        flag_tokens(ll, 0.0)


@pytest.mark.parametrize("positions", FLAG_SETS)
def test_cached_equals_naive_and_only_flagged_change(positions: tuple[int, ...]) -> None:
    model, seq = make_model(), make_seq()[0]
    flags = flags_at(*positions)
    cached = heal(model, seq, flags, num_samples=16, generator=torch.Generator().manual_seed(3))
    naive = heal_naive(model, seq, flags, num_samples=16, generator=torch.Generator().manual_seed(3))
    assert cached.shape == (16, L)
    assert torch.equal(cached, naive)
    original = seq[1:].expand(16, -1)
    assert torch.equal(cached[:, ~flags], original[:, ~flags])
    assert (cached[:, flags] != original[:, flags]).any()  # sharp model: some flagged token changes
    assert ((cached >= 0) & (cached < NUM_CODES)).all()


def test_cached_equals_naive_in_float32_and_with_options() -> None:
    model, seq = make_model(torch.float32), make_seq()[1]
    flags = flags_at(2, 3, 8, 15, 16)
    for options in ({}, {"temperature": 2.0}, {"top_k": 3}, {"temperature": 0.5, "top_k": 2}):
        a = heal(model, seq, flags, 12, generator=torch.Generator().manual_seed(5), **options)
        b = heal_naive(model, seq, flags, 12, generator=torch.Generator().manual_seed(5), **options)
        assert torch.equal(a, b), options


def test_no_flags_returns_copies_without_touching_the_model() -> None:
    class Exploding(torch.nn.Module):
        num_codes = NUM_CODES

        def forward(self, *args, **kwargs):
            raise AssertionError("the Transformer must not run without flags")

        def new_cache(self, batch_size):
            raise AssertionError("the Transformer must not run without flags")

    seq = make_seq()[0]
    healed = heal(Exploding(), seq, torch.zeros(L, dtype=torch.bool), num_samples=7)
    assert torch.equal(healed, seq[1:].expand(7, -1))


def test_nothing_after_the_last_flag_is_fed() -> None:
    """The cost follows the flagged tokens: prefix once (batch 1), then exactly N x (last - first) tokens."""
    model, seq = make_model(), make_seq()[0]
    fed: list[tuple[int, int]] = []
    handle = model.tok_emb.register_forward_hook(lambda m, i, o: fed.append(tuple(i[0].shape)))
    heal(model, seq, flags_at(4, 5, 12), num_samples=6)
    handle.remove()
    assert fed == [(1, 5), (6, 1), (6, 7)]


def test_never_samples_bos() -> None:
    logits = torch.full((500, NUM_CODES + 1), -10.0)
    logits[:, NUM_CODES] = 10.0  # BOS overwhelmingly likely if it were allowed
    draws = sample_codes(logits, NUM_CODES, generator=torch.Generator().manual_seed(0))
    assert draws.max() < NUM_CODES
    model, seq = make_model(), make_seq()[0]
    with torch.no_grad():
        model.head.weight[NUM_CODES] = 0
        model.head.bias = None
    healed = heal(model, seq, torch.ones(L, dtype=torch.bool), num_samples=32)
    assert healed.max() < NUM_CODES


def test_top_k_one_is_argmax_and_top_k_restricts() -> None:
    model, seq = make_model(torch.float32), make_seq()[0]
    flags = flags_at(1, 6, 7, 13)
    a = heal(model, seq, flags, 5, top_k=1, generator=torch.Generator().manual_seed(0))
    b = heal(model, seq, flags, 5, top_k=1, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, b) and (a == a[:1]).all()
    healed = seq.clone()
    for j in (1, 6, 7, 13):  # greedy, left to right
        logits = model(healed[None, : j + 1])[0, -1]
        healed[j + 1] = token_log_probs(logits, NUM_CODES).argmax()
    assert torch.equal(a[0], healed[1:])

    logits = torch.randn(4, NUM_CODES + 1)
    allowed = token_log_probs(logits, NUM_CODES).topk(3, dim=-1).indices
    draws = torch.stack([sample_codes(logits, NUM_CODES, top_k=3) for _ in range(200)], dim=1)
    for row in range(4):
        assert set(draws[row].tolist()) <= set(allowed[row].tolist())


def test_temperature_sharpens_and_flattens() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.0]]).expand(20000, -1)
    g = torch.Generator().manual_seed(0)

    def top_frequency(temperature: float) -> float:
        return (sample_codes(logits, 4, temperature=temperature, generator=g) == 0).float().mean().item()

    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0]), 0)[0].item()
    assert top_frequency(1.0) == pytest.approx(p, abs=0.02)
    assert top_frequency(0.25) > 0.95
    assert top_frequency(10.0) < 0.35
    with pytest.raises(ValueError):
        sample_codes(logits, 4, temperature=0.0)


def test_each_image_is_healed_at_its_own_flags() -> None:
    model, seqs = make_model(), make_seq(batch=2)
    flags = torch.stack([flags_at(0, 1), flags_at(L - 2, L - 1)])
    for b in range(2):
        out = heal(model, seqs[b], flags[b], num_samples=4, generator=torch.Generator().manual_seed(0))
        assert out.shape == (4, L)
        assert torch.equal(out[:, ~flags[b]], seqs[b, 1:].expand(4, -1)[:, ~flags[b]])
        naive = heal_naive(model, seqs[b], flags[b], num_samples=4, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, naive)


def test_accepts_batch_one_and_rejects_bad_shapes() -> None:
    model, seq = make_model(), make_seq()[0]
    flags = flags_at(3)
    a = heal(model, seq[None], flags[None], 3, generator=torch.Generator().manual_seed(0))
    b = heal(model, seq, flags, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        heal(model, make_seq(batch=2), flags, 3)
    with pytest.raises(ValueError):
        heal(model, seq, flags[:-1], 3)


def test_log_threshold_is_probability_threshold() -> None:
    ll = torch.tensor([[math.log(0.004), math.log(0.005), math.log(0.006)]])
    assert flag_tokens(ll, 0.005).tolist() == [[True, False, False]]
