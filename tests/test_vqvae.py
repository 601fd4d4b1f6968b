"""The first stage: where its dropout sits, that its codebook does not collapse, and its loss options."""

import pytest
import torch
from torch import nn

from scripts.tokens import latent_shape, load_token_masks, save_token_masks
from scripts.vqvae import (
    DropoutVQVAE,
    ReconstructionStats,
    VQVAELoss,
    codebook_usage,
    decoder_dropout_only,
    error_tally,
    fidelity,
)


def make(spatial_dims=2, **kwargs):
    torch.manual_seed(0)
    return DropoutVQVAE(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=1,
        channels=(8, 16),
        num_res_channels=(8, 16),
        num_res_layers=1,
        downsample_parameters=((2, 4, 1, 1),) * 2,
        upsample_parameters=((2, 4, 1, 1, 0),) * 2,
        num_embeddings=16,
        embedding_dim=4,
        **kwargs
    )


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_channel_wise_dropout_right_before_the_last_decoder_layer(spatial_dims):
    model = make(spatial_dims, decoder_dropout=0.3)
    blocks = list(model.decoder.blocks)
    index = blocks.index(model.decoder_dropout)
    assert isinstance(model.decoder_dropout, nn.Dropout2d if spatial_dims == 2 else nn.Dropout3d)
    assert index == len(blocks) - 2 and model.decoder_dropout.p == 0.3
    assert not any(isinstance(m, (nn.Dropout2d, nn.Dropout3d)) for m in model.encoder.modules())
    assert model.quantizer.quantizer.decay == 0.99  # not MONAI's 0.5


def test_only_decoder_dropout_makes_decodes_differ():
    model = make(decoder_dropout=0.5)
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad(), decoder_dropout_only(model):
        a, b = model(x)[0], model(x)[0]
        codes_a, codes_b = model.index_quantize(x), model.index_quantize(x)
    assert not torch.equal(a, b) and torch.equal(codes_a, codes_b)
    assert model.training  # modes restored


def test_codebook_starts_from_data_and_does_not_collapse():
    model = make()
    x = torch.rand(8, 1, 16, 16) * 50  # far from MONAI's N(0, 1) initial codebook
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(5):
        optimizer.zero_grad()
        VQVAELoss()(model(x), x).backward()
        optimizer.step()
    model.eval()
    used, perplexity = codebook_usage(model.index_quantize(x), model.num_embeddings)
    assert used > 4 and perplexity > 2


def test_loss_options():
    x, y, q = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16), torch.tensor(0.25)
    l1 = (x - y).abs().mean()
    assert torch.isclose(VQVAELoss()((x, q), y), l1 + q)
    assert torch.isclose(VQVAELoss(reconstruction="l2", quantisation_weight=0.0)((x, q), y), ((x - y) ** 2).mean())
    assert VQVAELoss(frequency_weight=1.0)((x, q), y) > l1 + q
    assert VQVAELoss(frequency_weight=1.0, spatial_dims=3)((x[..., None], q), y[..., None]) > 0
    with pytest.raises(ValueError):
        VQVAELoss(reconstruction="huber")


def test_latent_shape_comes_from_the_model_and_token_masks_round_trip(tmp_path):
    model = make()
    assert latent_shape(model, 1, (32, 24)) == (8, 6)
    files = [{"image": "a.png"}, {"image": "b.png"}]
    masks = torch.rand(2, 8, 6) > 0.5
    save_token_masks(str(tmp_path / "m.pt"), files, masks)
    assert torch.equal(load_token_masks(str(tmp_path / "m.pt"), files[::-1], (8, 6)), masks.flip(0))
    with pytest.raises(ValueError, match="shape"):
        load_token_masks(str(tmp_path / "m.pt"), files, (4, 4))


def test_validation_leaves_the_codebook_alone() -> None:
    """The evaluator's handlers run after MONAI has put the network back in training mode; quantising there would
    move the EMA codebook with validation images."""
    from ignite.engine import Engine

    model = make()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine(lambda *_: None)
    engine.network = model
    image = torch.rand(2, 1, 16, 16)
    engine.state.output, engine.state.batch = {"image": image, "pred": image}, {}
    stats = ReconstructionStats()
    stats._reset(engine)
    stats._update(engine)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_intensity_matched_error_weighs_normal_bins_as_the_anomalies_fall_and_borrows_the_nearest() -> None:
    anomaly = torch.tensor([[0.0, 0.3, 0.0, 0.5], [0.0, 3.0, 0.0, 1.0]])  # L1 sums, voxel counts per intensity bin
    normal = torch.tensor([[10.0, 40.0, 60.0, 0.0], [100.0, 100.0, 100.0, 0.0]])
    out = fidelity(torch.cat([anomaly, normal]))
    # bins 1 (x3) and 3 (no normal voxels: its nearest, bin 2) -> (3 * 0.4 + 0.6) / 4
    assert out["l1_matched"] == pytest.approx(0.45)
    assert out["l1_anomaly"] == pytest.approx(0.8 / 4) and out["l1_normal"] == pytest.approx(110 / 300)
    assert set(fidelity(torch.cat([torch.zeros(2, 4), normal]))) == {"l1_normal"}


def test_validation_reports_the_intensity_matched_error_summed_over_ranks(monkeypatch) -> None:
    """Normal voxels err in proportion to their brightness; the anomalies sit on the brightest ones, so their matched
    error is the bright normal voxels' error, not the mean over all normal voxels. The ranks' tallies add up."""
    from ignite.engine import Engine

    from scripts import distributed

    engine = Engine(lambda *_: None)
    engine.network = make()
    image = torch.full((2, 1, 16, 16), 0.1)
    image[:, :, 8:] = 0.9  # bright half
    mask = torch.zeros_like(image)
    mask[:, :, 12:, 4:8] = 1  # anomalies in the bright half
    pred = image * (1 + 0.1 * (1 - mask)) + 0.2 * mask  # normal error 0.1 x intensity, anomalous error 0.2
    engine.state.output, engine.state.batch = {"image": image, "pred": pred}, {"label": mask}
    stats = ReconstructionStats()
    stats._reset(engine)
    stats._update(engine)
    other = error_tally(image, pred + 0.2 * mask, mask)  # a second rank's shard: its anomalies err 0.4
    monkeypatch.setattr(distributed, "gather", lambda part: [part, (other, part[1])])
    stats._complete(engine)
    metrics = engine.state.metrics
    assert metrics["val_l1_anomaly"] == pytest.approx(0.3)
    assert metrics["val_l1_matched"] == pytest.approx(0.09)  # bright normal voxels only
    assert metrics["val_l1_normal"] == pytest.approx((128 * 0.01 + 112 * 0.09) / 240)  # per image: dim, bright normal


def test_a_perfect_denoiser_of_pet_like_noise_is_faithful_only_by_the_intensity_matched_ratio() -> None:
    """The 3D demo's noise grows with uptake and most of its volume is air: the noise-free image, a perfect
    reconstruction for any model that does not learn the noise, errs far more inside the hot lesions than
    elsewhere, but no more than on normal tissue as bright. Lesions reconstructed as the tissue under them fail
    both ratios."""
    import numpy as np

    from scripts.synthetic.pet import noise_floor, prototype_bank_3d, sample_3d

    floor = noise_floor(n=6)
    assert floor["l1_ratio"] > 3 and floor["l1_ratio_matched"] < 1.5
    grid, fov = (16, 16, 32), (384.0, 384.0, 768.0)
    bank = prototype_bank_3d(0, grid=grid, fov_mm=fov)
    tally = 0
    for i in range(6):
        lesion_free, image, mask, _ = sample_3d(0, "validation", i, True, grid, fov, 0.8, bank)
        image, lesion_free = (torch.from_numpy(np.clip(a, 0, 15) / 15)[None, None] for a in (image, lesion_free))
        tally = tally + error_tally(image, lesion_free, torch.from_numpy(mask)[None, None])
    erased = fidelity(tally)
    assert erased["l1_anomaly"] / erased["l1_matched"] > 3


def test_settings_of_two_networks_mixed_are_named_with_the_likely_cause() -> None:
    """A preset given with another preset's checkpoint to configs/inference.yaml: two levels of channels from the
    preset, three of downsampling from the checkpoint's record. MONAI's own message names one argument only."""
    with pytest.raises(ValueError, match=r"vqvae_def: MONAI's VQVAE refuses .*configs/inference.yaml alone"):
        DropoutVQVAE(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8), num_res_channels=(8, 8),
                     downsample_parameters=((2, 4, 1, 1),) * 3, upsample_parameters=((2, 4, 1, 1, 0),) * 3)  # fmt: skip
