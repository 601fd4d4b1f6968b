"""The detector: decoder-only dropout at inference, shapes for 2D/3D, reproducibility, the ablation, its state_dict."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scripts.detector import AnomalyDetector, _seeded_rng, place_flags, segment
from scripts.kde import kde_log_density
from scripts.transformer import MaskedTransformer
from scripts.vqvae import DropoutVQVAE, decoder_dropout_only

CODES = 16


pytestmark = pytest.mark.usefixtures("single_thread")


def make_detector(spatial_dims: int = 2, seed: int = 0, **kwargs) -> AnomalyDetector:
    torch.manual_seed(seed)
    vqvae = DropoutVQVAE(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=1,
        channels=(8, 8),
        num_res_channels=(8, 8),
        num_res_layers=1,
        downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
        upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
        num_embeddings=CODES,
        embedding_dim=4,
        decoder_dropout=0.2,
    )
    grid = (16 if spatial_dims == 2 else 8) // 4
    transformer = MaskedTransformer(CODES + 1, grid**spatial_dims, embed_dim=16, num_layers=2, num_heads=2)
    options = dict(num_samples=4, num_decodes=3, resample_threshold=0.5, decode_batch_size=5)
    options.update(kwargs)
    return AnomalyDetector(vqvae, transformer, **options)


def image(spatial_dims: int = 2, batch: int = 2) -> torch.Tensor:
    size = 16 if spatial_dims == 2 else 8
    return torch.rand((batch, 1, *([size] * spatial_dims)), generator=torch.Generator().manual_seed(7))


def test_only_decoder_dropout_is_active_and_modes_are_restored(monkeypatch) -> None:
    monkeypatch.setattr(DropoutVQVAE, "_last_conv", lambda self: None)  # the last layer as a module, to be seen
    detector = make_detector()
    detector.train()
    detector.transformer.blocks[0].eval()  # a mixed state must come back as it was
    before = {name: m.training for name, m in detector.named_modules()}
    seen: dict[str, set[bool]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, name=name: seen.setdefault(name, set()).add(mod.training))
        for name, m in detector.named_modules()
        if name
    ]
    detector(image())
    for h in hooks:
        h.remove()
    # the dropout is registered twice (as vqvae.decoder_dropout and inside the decoder's blocks)
    dropout_name = next(name for name, m in detector.named_modules() if m is detector.vqvae.decoder_dropout)
    assert seen[dropout_name] == {True}
    assert seen["vqvae.encoder"] == {False} and seen["vqvae.decoder.blocks.0"] == {False}
    assert seen["transformer"] == {False}
    active = {name for name, modes in seen.items() if True in modes}
    assert active == {dropout_name}
    assert {name: m.training for name, m in detector.named_modules()} == before


def test_dropout_makes_decodes_differ() -> None:
    """With decoder dropout the M decodes of one latent differ; that spread is what the KDE measures."""
    detector = make_detector(num_samples=1, num_decodes=4, resample=False)
    x = image(batch=1)
    with torch.no_grad(), decoder_dropout_only(detector.vqvae):
        latent = detector.vqvae.index_quantize(x)
        decodes = detector._decode(latent, 4, tuple(x.shape[1:]))
    assert decodes.std(0).max() > 0


@pytest.mark.parametrize("folded", [True, False])
@pytest.mark.parametrize("num_decodes, batch, spatial_dims", [(5, 30, 2), (3, 4, 2), (1, 7, 2), (3, 4, 3)])
def test_shared_decoding_equals_decoding_every_reconstruction(
    num_decodes: int, batch: int, spatial_dims: int, folded: bool, monkeypatch
) -> None:
    """The decoder's part before its dropout is computed once per distinct latent, and the last layer gives all
    decodes of a latent in one pass with the dropout noise in its weights; with the same seed the reconstructions
    equal those of running the whole decoder on all R = N*M (the path of version 0.2), because the dropout draws the
    same masks in the same order. Batches that split a latent's decodes are included, and the plain last layer
    used where it is not a bare convolution."""
    if not folded:
        monkeypatch.setattr(DropoutVQVAE, "_last_conv", lambda self: None)
    detector = make_detector(spatial_dims, num_samples=6, num_decodes=num_decodes)
    detector.decode_batch_size = batch
    x = image(spatial_dims, batch=1)
    with torch.no_grad(), decoder_dropout_only(detector.vqvae):
        latent = detector.vqvae.index_quantize(x)
        latents = torch.cat([latent.expand(3, *latent.shape[1:]), latent.roll(1, -1).expand(3, *latent.shape[1:])])
        torch.manual_seed(0)
        shared = detector._decode(latents, num_decodes, tuple(x.shape[1:]))
        torch.manual_seed(0)
        every = latents.repeat_interleave(num_decodes, dim=0)
        whole = torch.cat([detector.vqvae.decode_samples(every[i : i + batch]) for i in range(0, len(every), batch)])
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_forward_and_infer_shapes(spatial_dims: int) -> None:
    detector = make_detector(spatial_dims)
    x = image(spatial_dims)
    score = detector(x)
    assert score.shape == (2, 1, *x.shape[2:]) and score.dtype == torch.float32
    assert torch.isfinite(score).all()
    out = detector.infer(x)
    grid = detector.vqvae.index_quantize(x).shape[1:]
    for key in ("score", "log_density", "segmentation", "token_log_likelihood", "flags"):
        assert out[key].shape == (2, 1, *x.shape[2:]), key
    assert out["latent_log_likelihood"].shape == out["latent_flags"].shape == (2, *grid)
    assert out["segmentation"].dtype == out["flags"].dtype == torch.bool
    assert torch.equal(out["num_flagged"], out["latent_flags"].flatten(1).sum(1))
    assert torch.equal(out["segmentation"], out["log_density"] < math.log(detector.density_threshold))
    assert torch.equal(out["score"], -out["log_density"])
    assert torch.equal(out["flags"], out["token_log_likelihood"] < math.log(detector.resample_threshold))


def test_same_seed_same_map_and_batch_invariance() -> None:
    detector = make_detector()
    x = image()
    state = torch.get_rng_state()
    a, b = detector(x), detector(x)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)  # callers' random streams are untouched
    torch.testing.assert_close(detector(x[1:]), a[1:])  # a map does not depend on its batch
    detector.seed = 1
    assert not torch.equal(detector(x), a)


def test_resample_false_ablation_differs_from_healing() -> None:
    detector = make_detector(resample=False)
    x = image(batch=1)
    out = detector.infer(x)
    assert out["score"].shape == (1, 1, 16, 16)
    with_resampling = detector.infer(x, resample=True)["score"]
    assert out["num_flagged"].item() > 0 and not torch.equal(with_resampling, out["score"])


def test_resample_false_equals_manual_dropout_decoding() -> None:
    detector = make_detector(resample=False, num_samples=2, num_decodes=3, decode_batch_size=100)
    x = image(batch=1)
    out = detector.infer(x)
    with torch.no_grad(), decoder_dropout_only(detector.vqvae), _seeded_rng(x.device, detector.seed):
        latent = detector.vqvae.index_quantize(x)
        recons = detector.vqvae.decode_samples(latent.expand(6, -1, -1))
    expected = kde_log_density(x[0], recons, detector.epsilon)
    torch.testing.assert_close(out["log_density"][0], expected)


def test_no_flags_means_original_latent() -> None:
    """t tiny -> nothing flagged -> healing returns the original latent: the ablation's map exactly."""
    detector = make_detector(resample_threshold=1e-30)
    x = image()
    out = detector.infer(x)
    assert out["num_flagged"].sum() == 0
    torch.testing.assert_close(out["score"], detector.infer(x, resample=False)["score"])


def test_restrict_to_flags_scores_only_near_flagged_tokens() -> None:
    """Prior work's map restriction: far from every flag a voxel's density is as normal as the KDE allows and its score
    below every score near a flag, in the unrestricted map's order; near flags the map is the unrestricted one; without
    flags nothing is segmented, yet the map still ranks voxels as the unrestricted one does; the ablation ignores it."""
    plain, restricted = make_detector(restrict_sigma=1.0), make_detector(restrict_to_flags=True, restrict_sigma=1.0)
    x = image(batch=1)
    log_lik = plain.infer(x)["latent_log_likelihood"][0]
    threshold = float(log_lik.flatten().sort().values[0].exp()) * 1.0001  # exactly one flagged token
    a, b = plain.infer(x, resample_threshold=threshold), restricted.infer(x, resample_threshold=threshold)
    assert int(b["num_flagged"]) == 1
    near = restricted.near_flags(b["flags"])
    assert near.any() and not near.all() and near[b["flags"]].all()
    torch.testing.assert_close(b["log_density"][near], a["log_density"][near])
    assert (b["log_density"][~near] == restricted.max_log_density).all()
    assert (b["log_density"] <= restricted.max_log_density + 1e-5).all()  # nothing is more normal than "far"
    torch.testing.assert_close(b["score"][near], a["score"][near])
    assert b["score"][~near].max() < -restricted.max_log_density <= b["score"][near].min() + 1e-5
    far, unrestricted = b["score"][~near], a["score"][~near]  # far from flags: below, but in the map's own order
    assert torch.equal(far.argsort(stable=True), unrestricted.argsort(stable=True)) and far.unique().numel() > 1
    torch.testing.assert_close(b["unrestricted_score"], a["score"])
    torch.testing.assert_close(a["restricted_score"], b["score"])  # both maps, whichever the detector serves
    assert b["score"].min() >= restricted.lowest_score == plain.lowest_score - 1.0 == -plain.max_log_density - 1.0
    none = restricted.infer(x, resample_threshold=1e-30)
    assert (none["log_density"] == restricted.max_log_density).all() and not none["segmentation"].any()
    free = plain.infer(x, resample_threshold=1e-30)["score"].flatten()
    assert torch.equal(none["score"].flatten().argsort(stable=True), free.argsort(stable=True))  # never one value
    ablation = restricted.infer(x, resample=False, resample_threshold=threshold)["log_density"]
    torch.testing.assert_close(ablation, plain.infer(x, resample=False, resample_threshold=threshold)["log_density"])


def test_segment_is_one_rule_for_tensors_and_arrays() -> None:
    """Inference, evaluation, overlays and ILTM's masks all call ``segment``: density < threshold, either type."""
    log_density = torch.linspace(-8.0, 2.0, 101)
    for threshold in (0.005, 1.275):
        seg = segment(-log_density, threshold)
        assert torch.equal(seg, log_density < math.log(threshold)) and seg.any() and not seg.all()
        assert (segment((-log_density).numpy(), threshold) == seg.numpy()).all()


@pytest.mark.parametrize("name", ["resample", "amp", "restrict_to_flags"])
def test_switches_refuse_strings(name: str) -> None:
    """`--restrict_to_flags false` on the command line is the string "false", which is true: refused, named."""
    with pytest.raises(TypeError, match=name):
        make_detector(**{name: "false"})


def test_per_call_sample_counts() -> None:
    """ILTM's mask passes override N and M per call; the result equals a detector built with those counts."""
    detector, other = make_detector(), make_detector(num_samples=2, num_decodes=5)
    x = image(batch=1)
    torch.testing.assert_close(detector.infer(x, num_samples=2, num_decodes=5)["score"], other(x))
    with pytest.raises(ValueError):
        detector.infer(x, num_samples=0)


def test_state_dict_round_trip() -> None:
    detector = make_detector()
    other = make_detector(seed=1)
    x = image()
    assert not torch.equal(detector(x), other(x))
    keys = set(detector.state_dict())
    assert any(k.startswith("vqvae.") for k in keys) and any(k.startswith("transformer.") for k in keys)
    other.load_state_dict(detector.state_dict())
    assert torch.equal(detector(x), other(x))


def test_place_flags_moves_each_images_flags_onto_the_least_likely_neighbourhood() -> None:
    """An isolated unlikely token loses its flag to a region of moderately unlikely ones; each image keeps its count."""
    ll = torch.zeros(2, 10, 10)
    ll[0, 2, 7] = -9.0  # a rare token alone
    ll[0, 4:8, 2:6] = -3.0  # a region: each token more likely than the rare one, its neighbourhood less so
    ll[1, 0, 0] = -1.0
    raw = ll < -1.5  # image 0: 17 flags, image 1: none
    placed = place_flags(ll, raw, 3)
    assert placed.dtype == torch.bool and placed.shape == raw.shape
    assert torch.equal(placed.flatten(1).sum(1), raw.flatten(1).sum(1))
    assert placed[0, 4:8, 2:6].all() and not placed[0, 2, 7] and not placed[1].any()
    assert torch.equal(place_flags(ll, raw, 1), raw)  # k = 1: the mean over one token is the token
    ll3 = torch.zeros(1, 8, 8, 8)
    ll3[0, 1:3, 1:3, 1:3] = -2.0
    ll3[0, 5, 5, 5] = -9.0
    assert place_flags(ll3, ll3 < -1.5, 3)[0, 1:3, 1:3, 1:3].all()  # 3D: k x k x k
    # a grid with sides below the neighbourhood (a small image_size's 2 x 2 x 4 tokens): narrower there, no error
    small = torch.zeros(1, 2, 2, 4)
    small[0, :, :, 3] = -5.0
    assert torch.equal(place_flags(small, small < -1.0, 3), small < -1.0)


def test_flag_neighbourhood_keeps_each_images_number_of_flags() -> None:
    x = image()
    plain, placed = make_detector(), make_detector(flag_neighbourhood=3)
    t = float(plain.infer(x)["latent_log_likelihood"].quantile(0.3).exp())  # about a third of the tokens flagged
    a, b = plain.infer(x, resample_threshold=t), placed.infer(x, resample_threshold=t)
    assert torch.equal(a["num_flagged"], b["num_flagged"]) and int(a["num_flagged"].sum()) > 0
    assert not torch.equal(a["latent_flags"], b["latent_flags"])
    expected = place_flags(a["latent_log_likelihood"], a["latent_flags"], 3)
    assert torch.equal(b["latent_flags"], expected)
    for bad in (0, 2, 3.0, True):
        with pytest.raises(ValueError, match="flag_neighbourhood"):
            make_detector(flag_neighbourhood=bad)


def test_threshold_override_and_segmentation_threshold() -> None:
    detector = make_detector()
    x = image()
    none = detector.infer(x, resample_threshold=1e-30)
    assert none["num_flagged"].sum() == 0
    all_flagged = detector.infer(x, resample_threshold=1.0)
    assert (all_flagged["num_flagged"] == all_flagged["latent_flags"][0].numel()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_runs_on_the_inputs_device() -> None:
    detector = make_detector().cuda()
    x = image().cuda()
    out = detector.infer(x)
    assert out["score"].device.type == "cuda" and out["score"].dtype == torch.float32
    assert torch.isfinite(out["score"]).all()
    assert torch.equal(detector(x), detector(x))
    fp32 = make_detector(amp=False).cuda()(x)
    assert fp32.shape == out["score"].shape and torch.isfinite(fp32).all()


def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        make_detector(amp_dtype="float8")
    with pytest.raises(ValueError):
        make_detector(num_samples=0)
    assert isinstance(make_detector(), nn.Module)


def test_diagnose_leaves_only_the_labelled_tokens_out_of_later_contexts() -> None:
    """The diagnostic's log-likelihoods equal inference's with nothing left out; leaving one token out changes only
    the tokens after it in raster order, which no longer see it."""
    from scripts.diagnose import _out_of_context

    detector, x = make_detector(), image()
    items = [{"image": one} for one in x]
    plain = detector.infer(x)["latent_log_likelihood"]
    nothing = torch.zeros_like(plain, dtype=torch.bool)
    assert torch.allclose(_out_of_context(detector, items, nothing, 2), plain, atol=1e-5)
    one_token = nothing.clone()
    one_token[:, 1, 2] = True  # raster position 6 of the 4 x 4 grid
    clean, plain = _out_of_context(detector, items, one_token, 1).flatten(1), plain.flatten(1)
    assert torch.allclose(clean[:, :7], plain[:, :7], atol=1e-5)  # its own prediction never saw it
    assert ((clean[:, 7:] - plain[:, 7:]).abs() > 1e-6).all()
