"""The KDE's intensity units: settings stated on the paper's scale, one converted value everywhere, same answers on
any input scale."""

from __future__ import annotations

import math
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from scripts.detector import check_density_threshold
from scripts.iltm import tokens_from_map
from scripts.kde import kde_log_density

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("single_thread")


def test_density_threshold_and_epsilon_convert_with_the_intensity_scale() -> None:
    """KDE on 0-255 with the paper's MVTec values = KDE on [0, 1] with epsilon / 255 and threshold * 255."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand((1, 24, 24), generator=g)
    recon = (image + 0.1 * torch.randn((30, 1, 24, 24), generator=g)).clamp(0, 1)
    recon[:, :, 5:9, 5:9] = 0.2  # a region every reconstruction "heals"
    raw = kde_log_density(image * 255, recon * 255, epsilon=12.75)
    unit = kde_log_density(image, recon, epsilon=12.75 / 255)
    torch.testing.assert_close(unit, raw + math.log(255), rtol=0, atol=1e-4)  # a density is per unit of intensity
    segmented = unit < math.log(0.005 * 255)
    assert torch.equal(segmented, raw < math.log(0.005))
    assert 0 < int(segmented.sum()) < segmented.numel()


@pytest.mark.parametrize(
    "preset, epsilon, threshold",
    [(None, 0.05, 1.275), ("demo.yaml", 0.05, 1.275), ("mvtec.yaml", 0.05, 1.275), ("demo3d.yaml", 0.05, 0.005),
     ("autopet.yaml", 0.05, 0.005)],
)  # fmt: skip
def test_every_consumer_reads_the_converted_values(preset, epsilon, threshold) -> None:
    """Training's detector and ILTM masks, inference's detector, segmentation and evaluation's Dice agree."""
    values = {}
    for base in ("train.yaml", "inference.yaml"):
        files = [os.path.join(ROOT, "configs", f) for f in filter(None, (base, preset))]
        parser = ConfigParser(ConfigParser.load_config_files(files))
        parser.update({"bundle_root": ROOT})
        values[base] = (parser.get_parsed_content("kde_epsilon"), parser.get_parsed_content("density_threshold"))
        assert parser.get("network_def")["epsilon"] == "@kde_epsilon"
        assert parser.get("network_def")["density_threshold"] == "@density_threshold"
        if base == "train.yaml":
            assert parser.get_parsed_content("iltm#mask_density_threshold") == pytest.approx(threshold)
    assert values["train.yaml"] == pytest.approx((epsilon, threshold))
    assert values["inference.yaml"] == pytest.approx((epsilon, threshold))
    assert parser.get_parsed_content("segmentation_threshold") == pytest.approx(threshold)  # what segments below
    with open(os.path.join(ROOT, "configs", "inference.yaml")) as f:
        text = f.read()
    assert "@segmentation_threshold" in text.split("postprocessing:")[1]  # the saved segmentation uses the same value
    with open(os.path.join(ROOT, "configs", "evaluate.yaml")) as f:
        assert 'density_threshold: "@segmentation_threshold"' in f.read()  # Dice at the detector's threshold


def test_same_image_at_two_intensity_scales_gives_the_same_segmentation_and_masks(tmp_path) -> None:
    """An 8-bit PNG, the same image as a 16-bit PNG and as a float NIfTI on [0, 1], each with its intensity range."""
    rng = np.random.default_rng(0)
    base = (rng.random((64, 64)) * 120 + 60).astype(np.uint8)
    base[20:30, 30:40] = 250
    Image.fromarray(base).save(tmp_path / "a8.png")
    Image.fromarray((base.astype(np.uint16) * 257)).save(tmp_path / "a16.png")
    nib.save(
        nib.Nifti1Image(base.T.astype(np.float32) / 255.0, np.eye(4)), tmp_path / "a.nii.gz"
    )  # PNG reads transposed
    files = [os.path.join(ROOT, "configs", f) for f in ("train.yaml", "demo.yaml")]
    results = []
    for name, top in (("a8.png", 255.0), ("a16.png", 65535.0), ("a.nii.gz", 1.0)):
        parser = ConfigParser(ConfigParser.load_config_files(files))
        parser.update({"bundle_root": ROOT, "intensity_max": top, "num_samples": 4, "num_decodes": 2})
        torch.manual_seed(0)
        detector = parser.get_parsed_content("network_def").eval()
        image = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / name)})["image"]
        out = detector.infer(image[None], resample_threshold=0.05)
        masks = tokens_from_map(out["log_density"] < math.log(parser.get_parsed_content("iltm#mask_density_threshold")),
                                tuple(out["latent_flags"].shape[1:]))  # fmt: skip
        results.append((image, out["segmentation"], masks))
    for image, segmentation, masks in results[1:]:
        torch.testing.assert_close(image, results[0][0], rtol=0, atol=1e-6)
        assert torch.equal(segmentation, results[0][1]) and torch.equal(masks, results[0][2])
    assert results[0][1].any()


def test_a_threshold_no_density_can_reach_below_is_refused() -> None:
    """Above 1 / (epsilon sqrt(2 pi)) every voxel is anomalous and ILTM masks every token: refused before any work,
    e.g. a 0-255 threshold given without its scale, or one made 10x looser by hand (12.75 with epsilon 0.05)."""
    parser = ConfigParser(ConfigParser.load_config_files([os.path.join(ROOT, "configs", "train.yaml")]))
    parser.update({"bundle_root": ROOT, "kde_units#density_threshold": 0.05})  # x 255 = 12.75 > 7.98
    with pytest.raises(RuntimeError) as caught:  # MONAI wraps a component's error; ours is the cause
        parser.get_parsed_content("network_def")
    assert "density_threshold 12.75 is at or above the largest density" in str(caught.value.__cause__)
    check_density_threshold("mask_density_threshold", 7.9, 0.05)  # just below the ceiling: allowed
    with pytest.raises(ValueError, match="mask_density_threshold"):
        check_density_threshold("mask_density_threshold", 8.0, 0.05)
