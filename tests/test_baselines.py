"""The baselines (scripts/baselines/, configs/baseline_*.yaml): their networks, losses and augmentations, and training
and evaluation through the bundle commands a user runs, on the same data as ILTM."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run

from scripts.baselines.cutpaste import CutPasteBatch, CutPasteNet, PatchGaussianDetector, cutpaste, scar
from scripts.baselines.dense import DenseAutoEncoder, DenseLoss, ResidualDetector
from scripts.baselines.nsa import NSABatch, blend_patch, poisson_blend
from scripts.baselines.stkd import keep_least_anomalous
from scripts.checkpoint import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
DATA = {"synthetic#n_train": 8, "synthetic#n_val": 2, "synthetic#n_test": 4, "synthetic#image_size": 32,
        "image_size": [32, 32]}  # fmt: skip
TINY = {
    **DATA,
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
    assert results["dice_at_density_threshold"] is None and results["density_threshold"] is None  # no density map
    maps = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(out, "evaluation")) for n in names]
    assert not [m for m in maps if m.endswith("_seg.nii.gz")]  # nor a segmentation at ILTM's threshold
    maps = [m for m in maps if m.endswith("_score.nii.gz")]
    assert len(maps) == 4
    assert nib.load(maps[0]).shape[:2] == (32, 32)  # the synthetic images' own size
    with pytest.raises(Exception) as error:
        run("evaluating", config_file=evaluate, **{**common, "dense#variational": False, "output_dir": out,
                                                   "checkpoint": os.path.join(out, "model.pt")})  # fmt: skip
    cause = error.value
    while cause is not None and not isinstance(cause, CheckpointError):  # MONAI wraps the handler's error
        cause = cause.__cause__ or cause.__context__
    assert (
        "holds the Dense VAE (Baur et al.) detector (dense_vae), but this config builds Dense AE (Baur et al.)'s"
        in (str(cause))
    )  # the way on, not back to "configs/inference.yaml alone", which would not build a baseline
    assert "layer 'configs/baseline_dense.yaml' last and pass --dense#variational True" in str(cause)
    with pytest.raises(Exception) as error:  # another network setting: the way back is the layer and its overrides
        run("evaluating", config_file=evaluate, **{**common, "dense#latent_size": 8})
    cause = next(c for c in (error.value, error.value.__cause__) if isinstance(c, CheckpointError))
    assert "Use the preset and layer it was trained with (configs/baseline_dense.yaml last)" in str(cause)


def test_cutpaste_pastes_a_rectangle_of_the_image_where_the_mask_says() -> None:
    torch.manual_seed(0)
    image = torch.rand(1, 64, 64)
    for _ in range(20):
        out, mask = cutpaste(image, jitter=0.0)
        assert torch.equal(out[:, ~mask], image[:, ~mask])  # nothing else changed
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        y, x, h, w = int(rows[0]), int(cols[0]), len(rows), len(cols)
        assert int(mask.sum()) == h * w and 0.015 <= h * w / 64**2 <= 0.16  # one rectangle, of the asked area
        block = out[:, y : y + h, x : x + w]
        sources = image.unfold(1, h, 1).unfold(2, w, 1)  # [1, H-h+1, W-w+1, h, w]: every rectangle of that size
        close = ((sources - block[:, None, None]).abs() < 1e-6).flatten(3).all(3)
        assert close.any()  # a copy of one of them (up to the rounding of a zero jitter)


def test_scar_is_a_thin_strip_and_keeps_the_range() -> None:
    torch.manual_seed(1)
    image = torch.rand(1, 256, 256)
    for _ in range(20):
        out, mask = scar(image)
        assert torch.equal(out[:, ~mask], image[:, ~mask]) and mask.any()
        assert int(mask.sum()) <= (16 + 2) * (25 + 2)  # at most 16 px wide and 25 px long
        assert out.min() >= 0 and out.max() <= 1
    batch = CutPasteBatch((0.02, 0.15), (0.3, 3.3), (2 / 256, 16 / 256), (10 / 256, 25 / 256))
    inputs, targets = batch({"image": torch.rand(4, 1, 32, 32)})
    assert inputs.shape == (12, 1, 32, 32) and targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_cutpaste_trains_fits_and_evaluates_through_the_bundle_commands(tmp_path) -> None:
    data, out = str(tmp_path / "data"), str(tmp_path / "cutpaste")
    small = {"cutpaste#patch_size": 16, "cutpaste#stride": 8, "cutpaste#batch_size": 4}
    common = {"bundle_root": ROOT, "dataset_dir": data, "output_dir": out, **DATA, **small}
    run(
        "training",
        config_file=_configs("train.yaml", "demo.yaml", "baseline_cutpaste.yaml"),
        **common,
        **{"cutpaste#epochs": 1},
    )  # MONAI's standard id trains the layer's baseline, as train_baseline does
    model = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    assert model["model"]["mean"].abs().sum() > 0 and not torch.equal(model["model"]["precision"], torch.eye(512))
    evaluate = _configs("inference.yaml", "demo.yaml", "evaluate.yaml", "baseline_cutpaste.yaml")
    run("evaluating", config_file=evaluate, **common)
    results = json.load(open(os.path.join(out, "metrics.json")))
    assert results["method"] == "cutpaste" and results["n_images"] == 4 and 0 <= results["aupro"] <= 1
    detector = PatchGaussianDetector(CutPasteNet(), patch_size=16, stride=8)
    assert detector.positions(36) == [0, 8, 16, 20]  # the last patch flush with the border
    assert detector(torch.rand(2, 1, 36, 36)).shape == (2, 1, 36, 36)
    flat = detector.score_map(torch.ones(16, 512), (36, 36))  # every patch equally far: the map is flat, borders too
    assert torch.allclose(flat, torch.full_like(flat, 512**0.5), rtol=1e-5)


def test_poisson_blend_keeps_the_border_and_the_source_texture() -> None:
    """Seamless cloning: the destination's values on the box border, the source's Laplacian inside."""

    def laplacian(x: np.ndarray) -> np.ndarray:  # wraps at the edges: compared inside the box only
        return sum(np.roll(x, k, a) for a in range(x.ndim) for k in (1, -1)) - 2 * x.ndim * x

    rng = np.random.default_rng(0)
    for shape in ((12, 10), (6, 7, 8)):
        destination, source = rng.random(shape), rng.random(shape)
        blended = poisson_blend(destination, source)
        border = np.ones(shape, dtype=bool)
        border[tuple(slice(1, -1) for _ in shape)] = False
        np.testing.assert_allclose(blended[border], destination[border], atol=1e-12)
        inside = tuple(slice(1, -1) for _ in shape)
        np.testing.assert_allclose(laplacian(blended)[inside], laplacian(source)[inside], atol=1e-9)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_nsa_blending_keeps_the_range_and_targets_only_the_box(spatial_dims: int) -> None:
    torch.manual_seed(0)
    size = [24] * spatial_dims
    destination, source = torch.rand(1, *size) * 0.5, torch.rand(1, *size) * 0.5 + 0.5  # the source is brighter
    for _ in range(10):
        out, target = blend_patch(destination, source)
        assert out.min() >= 0 and out.max() <= 1 and target.min() >= 0 and target.max() <= 1
        changed = (out - destination).abs()[0] > 1e-6
        assert changed.any() and not (target[~changed] > 0).any()  # the target only where the blend changed the image
    inputs, targets = NSABatch(max_patches=2)({"image": torch.rand(3, 1, *size)})
    assert inputs.shape == (3, 1, *size) and targets.shape == (3, 1, *size) and (targets > 0).any()


def test_nsa_trains_and_evaluates_through_the_bundle_commands(tmp_path) -> None:
    data, out = str(tmp_path / "data"), str(tmp_path / "nsa")
    small = {"nsa#channels": [4, 8], "nsa#strides": [2], "nsa#batch_size": 4, "nsa#epochs": 1}
    common = {"bundle_root": ROOT, "dataset_dir": data, "output_dir": out, **DATA, **small}
    run("train_baseline", config_file=_configs("train.yaml", "demo.yaml", "baseline_nsa.yaml"), **common)
    evaluate = _configs("inference.yaml", "demo.yaml", "evaluate.yaml", "baseline_nsa.yaml")
    run("evaluating", config_file=evaluate, **common)
    results = json.load(open(os.path.join(out, "metrics.json")))
    assert results["method"] == "nsa" and results["n_images"] == 4 and 0 <= results["aupro"] <= 1


def test_stkd_drops_the_highest_scores_then_distils_through_the_bundle_command(tmp_path) -> None:
    assert keep_least_anomalous([0.1, 0.9, 0.5, 0.7, 0.2], 0.4) == [0, 2, 4]  # the two highest dropped
    assert keep_least_anomalous([3.0, 1.0], 0.9) == [1]  # at least one image kept
    with pytest.raises(ValueError, match="drop_fraction"):
        keep_least_anomalous([1.0], 1.0)
    data, out = str(tmp_path / "data"), str(tmp_path / "stkd")
    small = {"cutpaste#patch_size": 16, "cutpaste#stride": 8, "cutpaste#batch_size": 4, "cutpaste#epochs": 1,
             "stkd#distill_epochs": 1, "stkd#drop_fraction": 0.25}  # fmt: skip
    common = {"bundle_root": ROOT, "dataset_dir": data, "output_dir": out, **DATA, **small}
    layers = ("baseline_cutpaste.yaml", "baseline_stkd.yaml")
    run("train_baseline", config_file=_configs("train.yaml", "demo.yaml", *layers), **common)
    rounds = json.load(open(os.path.join(out, "stkd", "rounds.json")))
    assert [r["trained_on"] for r in rounds["rounds"]] == [8, 6, 6]  # round 0 on all 8, then 2 dropped
    kept = rounds["kept"]  # the training images the student learnt from, by file
    assert len(set(kept)) == 6 and all(os.path.isfile(path) and "train_" in path for path in kept)
    state = json.load(open(os.path.join(out, "state.json")))
    assert {"round_0", "round_1", "student"} <= set(state)
    run("evaluating", config_file=_configs("inference.yaml", "demo.yaml", "evaluate.yaml", *layers), **common)
    results = json.load(open(os.path.join(out, "metrics.json")))
    assert results["method"] == "stkd" and results["n_images"] == 4
    # STKD's layer alone (CutPaste's forgotten): the message names the missing layer, not a config id
    alone = {k: v for k, v in common.items() if not k.startswith("cutpaste#")}
    with pytest.raises(Exception) as error:
        run("train_baseline", config_file=_configs("train.yaml", "demo.yaml", layers[1]), **alone)
    assert "baseline_stkd.yaml extends configs/baseline_cutpaste.yaml" in str(error.value.__cause__ or error.value)
    with pytest.raises(Exception) as error:
        run("evaluating", config_file=_configs("inference.yaml", "demo.yaml", "evaluate.yaml", layers[1]), **alone)
    assert "baseline_stkd.yaml extends configs/baseline_cutpaste.yaml" in str(error.value.__cause__)
    # and CutPaste's after STKD's, which would replace STKD's steps with its own: stopped too, before any training
    with pytest.raises(Exception) as error:
        run("train_baseline", config_file=_configs("train.yaml", "demo.yaml", *layers[::-1]), **common)
    assert "baseline_cutpaste.yaml came after configs/baseline_stkd.yaml" in str(error.value.__cause__)
    # STKD's detector under CutPaste's layer alone was scored, and recorded, as CutPaste's (the same network)
    with pytest.raises(Exception) as error:
        run("evaluating", config_file=_configs("inference.yaml", "demo.yaml", "evaluate.yaml", layers[0]),
            **{k: v for k, v in common.items() if not k.startswith("stkd#")})  # fmt: skip
    assert "holds the STKD (self-trained CutPaste) detector (stkd), but this config builds CutPaste" in str(
        error.value.__cause__
    )
    # and evaluate.yaml after the layers, which replaced the baseline's evaluation with ILTM's
    with pytest.raises(Exception) as error:
        run("evaluating", config_file=_configs("inference.yaml", "demo.yaml", *layers, "evaluate.yaml"), **common)
    assert "configs/evaluate.yaml came after configs/baseline_cutpaste.yaml and replaced the baseline's evaluation: " \
        "put configs/evaluate.yaml before the baseline's layers" in str(error.value.__cause__)  # fmt: skip
    # training is not checked against the folder's checkpoint: --overwrite True moves another method's run aside
    run("train_baseline", config_file=_configs("train.yaml", "demo.yaml", layers[0]),
        **{k: v for k, v in common.items() if not k.startswith("stkd#")}, overwrite=True)  # fmt: skip
    assert json.load(open(os.path.join(out, "state.json"))).keys() >= {"baseline"} and [
        p for p in os.listdir(tmp_path) if p.startswith("stkd.replaced-")
    ]


def test_a_presets_baseline_settings_reach_its_layer_and_a_misspelt_name_stops() -> None:
    """mvtec.yaml's `baselines` block sets what it names; the rest keeps the layer's default; the command line still
    wins; a name the layer does not have stops with the preset's key and the layer's settings in the message."""
    from monai.bundle import ConfigParser

    def nsa(preset: str, **overrides) -> dict:
        parser = ConfigParser()
        parser.read_config(_configs("train.yaml", preset, "baseline_nsa.yaml"))
        parser.update(overrides)
        return parser.get_parsed_content("nsa")

    demo, mvtec = nsa("demo.yaml"), nsa("mvtec.yaml")
    assert (mvtec["epochs"], mvtec["batch_size"]) == (320, 64) and (demo["epochs"], demo["batch_size"]) == (40, 8)
    assert mvtec["patch_size"] == demo["patch_size"]  # not named by the preset
    assert nsa("mvtec.yaml", **{"nsa#epochs": 2})["epochs"] == 2
    with pytest.raises(RuntimeError) as stop:
        nsa("mvtec.yaml", **{"baselines#nsa#epoch": 5})
    assert "baselines#nsa` names ['epoch']" in str(stop.value.__cause__) and "epochs" in str(stop.value.__cause__)
    with pytest.raises(RuntimeError) as stop:
        nsa("demo.yaml", **{"baselines": {"nsa_3d": {}}})
    assert "['nsa_3d']" in str(stop.value.__cause__)


def test_nsa_boxes_skip_the_background_when_asked(monkeypatch) -> None:
    """NSA's `skip_background`: both boxes at least a quarter object, so on a whole-body volume the blends are not
    air into air. Here the object is an 8 x 8 corner of a faintly noisy 32 x 32 background: every change lands within
    16 px of it; without the option, changes land elsewhere too; without any object, nothing is blended."""
    torch.manual_seed(0)
    image = torch.rand(1, 32, 32) * 0.05
    image[:, :8, :8] = 0.5 + 0.5 * torch.rand(1, 8, 8)
    far = torch.ones(32, 32, dtype=torch.bool)
    far[:16, :16] = False
    elsewhere = 0
    for _ in range(30):
        out, target = blend_patch(image, image.flip(-1).flip(-2), (0.25, 0.25), skip_background=(0.0, 0.1))
        assert not ((out - image).abs()[0] > 1e-6)[far].any() and not target[far].any()
        out, _ = blend_patch(image, image, (0.25, 0.25))
        elsewhere += int(((out - image).abs()[0] > 1e-6)[far].any())
    assert elsewhere > 0
    empty = torch.rand(1, 32, 32) * 0.05
    out, target = blend_patch(empty, empty, (0.25, 0.25), skip_background=(0.0, 0.1), attempts=20)
    assert torch.equal(out, empty) and not target.any()
    # the source box too: what is blended in is at least a quarter object (here the source's object is elsewhere)
    from scripts.baselines import nsa

    sources = []
    monkeypatch.setattr(nsa, "poisson_blend", lambda dst, src: sources.append(src) or dst)
    for _ in range(30):
        blend_patch(image, image.flip(-1).flip(-2), (0.25, 0.25), skip_background=(0.0, 0.1))
    assert len(sources) == 30 and all((abs(src) > 0.1).mean() >= 0.25 for src in sources)


@pytest.mark.parametrize("preset", ["demo.yaml", "demo3d.yaml", "small.yaml", "mvtec.yaml", "autopet.yaml"])
def test_every_baseline_layer_resolves_on_every_preset_for_training_and_evaluation(preset: str) -> None:
    """Parse only: each method's settings and network resolve under train.yaml and under inference.yaml +
    evaluate.yaml with the preset's `baselines` block; CutPaste and STKD refuse 3D presets, as documented."""
    from monai.bundle import ConfigParser

    from scripts.baselines import METHODS

    for name, method in METHODS.items():
        for base in (["train.yaml"], ["inference.yaml", "evaluate.yaml"]):
            parser = ConfigParser()
            parser.read_config(_configs(*base, preset, *[os.path.basename(layer) for layer in method.layers]))
            parser.update(method.overrides)
            refused = name in ("cutpaste", "stkd") and parser.get_parsed_content("spatial_dims") == 3
            for section in method.sections:
                if refused and section == "stkd":  # STKD's settings first build CutPaste's network (check_layers)
                    with pytest.raises(Exception, match="Failed to instantiate .*CutPasteNet"):
                        parser.get_parsed_content(section)
                    continue
                assert set(parser.get_parsed_content(section)) == set(parser.get(section)), (name, section)
            if refused:
                with pytest.raises(Exception):
                    parser.get_parsed_content("baseline_def")
            else:
                parser.get_parsed_content("baseline_def")


def test_random_crops_are_reseeded_each_epoch_so_a_resume_repeats_them() -> None:
    """CutPaste's random patch per image comes from MONAI's own random state, which the stage runner seeds from
    (seed, epoch) with torch's: a resumed epoch crops where the uninterrupted one did."""
    from types import SimpleNamespace

    from monai.data import DataLoader, Dataset
    from monai.transforms import RandSpatialCropd

    from scripts.steps import _reseed

    images = [{"image": torch.arange(64.0).reshape(1, 8, 8) + 100 * i} for i in range(3)]
    loader = DataLoader(Dataset(images, RandSpatialCropd(keys=["image"], roi_size=[3, 3], random_size=False)))
    engine = SimpleNamespace(data_loader=loader)

    def epoch(seed: int) -> list[float]:
        _reseed(engine, seed)
        return [float(batch["image"][0, 0, 0, 0]) for batch in loader]

    first = epoch(7)
    assert epoch(8) != first and epoch(7) == first


def test_each_baseline_networks_recorded_settings_name_the_layer_setting_behind_them() -> None:
    """A checkpoint mismatch of `autoencoder_def#latent_size` says `--dense#latent_size`: every such setting of the
    layer's network is the layer's own setting of the same name."""
    from monai.bundle import ConfigParser

    from scripts.checkpoint import DATA, SECTIONS
    from scripts.cli import passed_on

    layers = {"dense": "baseline_dense.yaml", "nsa": "baseline_nsa.yaml"}
    for network, section in SECTIONS.items():
        parser = ConfigParser()
        parser.read_config(_configs("train.yaml", "demo.yaml", layers[section]))
        names = [k for k in parser["baseline_def"] if not k.startswith("_") and k not in DATA]
        assert names and all(passed_on(parser, f"baseline_def#{name}") == f"{section}#{name}" for name in names)
