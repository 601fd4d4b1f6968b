"""The first stage: where its dropout sits, that its codebook does not collapse, and its loss options."""

import pytest
import torch
from torch import nn

from scripts.tokens import latent_shape, load_token_masks, save_token_masks
from scripts.vqvae import DropoutVQVAE, ReconstructionStats, VQVAELoss, codebook_usage, decoder_dropout_only


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
