"""The dense AE and dense VAE baselines (scripts/baselines.py, configs/baseline_dense.yaml): their networks and loss,
and training and evaluation through the bundle commands a user runs, on the same data as ILTM."""

from __future__ import annotations

import json
import os

import nibabel as nib
import pytest
import torch
from monai.bundle import run

from scripts.baselines import DenseAutoEncoder, DenseLoss, ResidualDetector
from scripts.checkpoint import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
TINY = {
    "synthetic#n_train": 8,
    "synthetic#n_val": 2,
    "synthetic#n_test": 4,
    "synthetic#image_size": 32,
    "image_size": [32, 32],
    "dense#channels": [8, 16],
    "dense#strides": [2, 2],
    "dense#latent_size": 16,
    "dense#batch_size": 4,
}


def _configs(*names: str) -> list[str]:
    return [os.path.join(CONFIGS, n) for n in names]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mean_reconstruction_at_inference_and_a_map_of_the_input_shape(spatial_dims: int) -> None:
    size = [16] * spatial_dims
    torch.manual_seed(0)
    vae = DenseAutoEncoder(spatial_dims, 1, size, latent_size=8, channels=(4, 8), strides=(2, 2), variational=True)
    x = torch.rand(2, 1, *size)
    vae.train()
    assert not torch.equal(vae(x)[0], vae(x)[0])  # the VAE samples its latent in training
    detector = ResidualDetector(vae)
    score = detector(x)
    assert score.shape == (2, 1, *size) and (score >= 0).all()
    assert torch.equal(score, detector(x))  # the mean latent at inference: one map per image
    assert vae.training  # the detector gave the network its mode back
    ae = DenseAutoEncoder(spatial_dims, 1, size, latent_size=8, channels=(4, 8), strides=(2, 2)).train()
    assert torch.equal(ae(x)[0], ae(x)[0])  # the AE never samples


def test_loss_is_l1_plus_the_vae_kl_term() -> None:
    recon, target = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    mu, logvar = torch.ones(2, 3), torch.zeros(2, 3)
    assert DenseLoss(0.0)((recon, mu, logvar), target).item() == pytest.approx(1.0)
    assert DenseLoss(0.5)((recon, mu, logvar), target).item() == pytest.approx(1.0 + 0.5 * 0.5)  # KL = mu^2 / 2
    assert DenseLoss(0.5)((recon, torch.zeros(2, 3), logvar), target).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="kl_weight"):
        DenseLoss(-1.0)


def test_trains_and_evaluates_through_the_bundle_commands(tmp_path) -> None:
    """Train a few epochs on the demo's data, then evaluate with the same metrics as ILTM; the VAE switch is recorded
    in the checkpoint, so evaluating it as the other model stops with the setting that differs."""
    data, out = str(tmp_path / "data"), str(tmp_path / "vae")
    common = {"bundle_root": ROOT, "dataset_dir": data, "output_dir": out, "dense#variational": True, **TINY}
    run("train_baseline", config_file=_configs("train.yaml", "demo.yaml", "baseline_dense.yaml"),
        **common, **{"dense#epochs": 2})  # fmt: skip
    state = json.load(open(os.path.join(out, "state.json")))
    assert state["baseline"]["weights"] == os.path.join("baseline", "weights.pt")
    assert os.path.isfile(os.path.join(out, "model.pt"))
    evaluate = _configs("inference.yaml", "demo.yaml", "evaluate.yaml", "baseline_dense.yaml")
    run("evaluating", config_file=evaluate, **common)
    results = json.load(open(os.path.join(out, "metrics.json")))
    assert results["method"] == "dense_vae" and results["n_images"] == 4
    assert 0.0 <= results["pixel_auroc"] <= 1.0 and 0.0 <= results["aupro"] <= 1.0
    maps = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(out, "evaluation")) for n in names]
    maps = [m for m in maps if m.endswith("_score.nii.gz")]
    assert len(maps) == 4
    assert nib.load(maps[0]).shape[:2] == (32, 32)  # the synthetic images' own size
    with pytest.raises(Exception) as error:
        run("evaluating", config_file=evaluate, **{**common, "dense#variational": False, "output_dir": out,
                                                   "checkpoint": os.path.join(out, "model.pt")})  # fmt: skip
    cause = error.value
    while cause is not None and not isinstance(cause, CheckpointError):  # MONAI wraps the handler's error
        cause = cause.__cause__ or cause.__context__
    assert "autoencoder_def#variational: trained with True, this config has False" in str(cause)
