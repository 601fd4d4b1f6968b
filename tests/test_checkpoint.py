"""scripts/checkpoint.py: a detector checkpoint records its settings, inference.yaml rebuilds the detector from them,
and every way a checkpoint can be unusable ends in one message naming the file and the cause."""

from __future__ import annotations

import os

import pytest
import torch
from monai.bundle import ConfigParser
from tiny import TINY_DETECTOR

from scripts.checkpoint import CheckpointError, TrainedSettings, detector_record, load_detector, save_detector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {**TINY_DETECTOR, "num_samples": 3}


def parsed(files: list[str], **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, "configs", f) for f in files])
    parser.update({"bundle_root": ROOT, **overrides})
    return parser


@pytest.fixture
def trained(tmp_path) -> str:
    parser = parsed(["train.yaml"], **TINY)
    detector = parser.get_parsed_content("network_def")
    path = str(tmp_path / "model.pt")
    save_detector(detector, detector_record(detector, parser.get_parsed_content("detector_settings")), path)
    return path


def test_inference_config_alone_rebuilds_the_trained_detector(trained: str) -> None:
    parser = parsed(["inference.yaml"], checkpoint=trained)
    assert parser.get_parsed_content("image_size") == [32, 32]
    assert parser.get_parsed_content("num_samples") == 3  # inference choices are adopted too, unless overridden
    detector = parser.get_parsed_content("network_def")
    record = load_detector(detector, trained, parser.get_parsed_content("detector_settings"))
    assert record["vqvae_def#channels"] == [8, 8]
    assert parsed(["inference.yaml"], checkpoint=trained, num_samples=7).get_parsed_content("num_samples") == 7


def test_a_contradicting_preset_names_the_settings(trained: str) -> None:
    parser = parsed(["inference.yaml", "demo.yaml"], checkpoint=trained)
    detector = parser.get_parsed_content("network_def")
    with pytest.raises(CheckpointError) as err:
        load_detector(detector, trained, parser.get_parsed_content("detector_settings"))
    message = str(err.value)
    assert trained in message and "vqvae_def#channels: trained with [8, 8], this config has [32, 64]" in message
    assert "spatial_dims" not in message and "num_samples" not in message  # the same; an inference choice


def test_data_settings_are_checked_too(trained: str) -> None:
    parser = parsed(["inference.yaml"], checkpoint=trained, intensity_max=1.0)
    detector = parser.get_parsed_content("network_def")
    with pytest.raises(CheckpointError, match="intensity_max: trained with 255.0, this config has 1.0"):
        load_detector(detector, trained, parser.get_parsed_content("detector_settings"))


@pytest.mark.parametrize(
    "content, cause",
    [
        (b"", "is empty"),
        (bytes(range(256)) * 4, "not a readable PyTorch weights file"),
        (b"PK\x03\x04" + bytes(100), "not a readable"),
        (None, "checkpoint not found"),
    ],
)
def test_unusable_files_are_named_with_their_cause(tmp_path, content: bytes | None, cause: str) -> None:
    path = str(tmp_path / "model.pt")
    if content is not None:
        with open(path, "wb") as f:
            f.write(content)
    detector = parsed(["inference.yaml"], checkpoint=path, **TINY).get_parsed_content("network_def")
    assert TrainedSettings(path).record == {}  # the config still parses; the loader names the problem
    with pytest.raises(CheckpointError, match=cause) as err:
        load_detector(detector, path)
    assert path in str(err.value)


def test_weights_of_another_shape_without_a_record(tmp_path) -> None:
    """Older checkpoints (a bare state dict) load as before; a wrong one gives a short message, not 100 lines."""
    small = parsed(["inference.yaml"], **TINY).get_parsed_content("network_def")
    path = str(tmp_path / "old.pt")
    torch.save(small.state_dict(), path)
    load_detector(parsed(["inference.yaml"], checkpoint=path, **TINY).get_parsed_content("network_def"), path)
    other = parsed(["inference.yaml"], checkpoint=path, **{**TINY, "vqvae_def#embedding_dim": 8})
    with pytest.raises(CheckpointError, match="do not fit") as err:
        load_detector(other.get_parsed_content("network_def"), path)
    assert len(str(err.value).splitlines()) < 10


@pytest.mark.parametrize("stage", ["vqvae", "transformer"])
def test_one_stages_weights_are_named_as_such(tmp_path, stage: str) -> None:
    """``vqvae/vqvae.pt`` or ``iltm/iter_KK/transformer.pt`` of a run passed as --checkpoint: without a record the
    detector has default sizes, and PyTorch's key lists would suggest another preset."""
    trained = parsed(["train.yaml"], **TINY).get_parsed_content("network_def")
    path = str(tmp_path / f"{stage}.pt")
    torch.save(getattr(trained, stage).state_dict(), path)
    detector = parsed(["inference.yaml"], checkpoint=path).get_parsed_content("network_def")
    with pytest.raises(CheckpointError, match=f"holds the weights of the detector's {stage} alone.*model.pt"):
        load_detector(detector, path)


def test_records_of_older_versions_are_read_with_todays_keys() -> None:
    """0.3.0 recorded the spatial chain as `resize`; it is still compared, as `spatial`."""
    from scripts.checkpoint import mismatches

    old = {"resize": ["Resized"], "resize_mode": "resize"}
    now = {"spatial": ["ResizeWithPadOrCropd"], "resize_mode": "pad_crop"}
    assert [line.split(":")[0] for line in mismatches(old, now)] == ["resize_mode", "spatial"]
    # a baseline network's copy of a data setting (the dense AE's image_size) is named once, as the data setting
    old, now = {"image_size": [64, 64], "autoencoder_def#image_size": [64, 64]}, {"image_size": [32, 32]}
    assert mismatches(old, {**now, "autoencoder_def#image_size": [32, 32]}) == [
        "image_size: trained with [64, 64], this config has [32, 32]"
    ]


def test_a_checkpoint_of_another_kind_of_detector_names_the_config_layer(trained: str, tmp_path) -> None:
    """An ILTM checkpoint under a baseline layer, a baseline's without its layer, or a bare state dict of another
    detector: the layer to add or drop, or a short list of the keys, never every key of both networks."""
    dense = {"dense#channels": [4, 8], "dense#strides": [2, 2], "dense#latent_size": 8}
    parser = parsed(["inference.yaml", "baseline_dense.yaml"], checkpoint=trained, **dense)
    baseline = parser.get_parsed_content("network_def")
    with pytest.raises(CheckpointError, match=r"holds the ILTM detector .* drop configs/baseline_dense.yaml"):
        load_detector(baseline, trained, parser.get_parsed_content("detector_settings"))
    path = str(tmp_path / "dense.pt")
    save_detector(baseline, detector_record(baseline, parser.get_parsed_content("detector_settings")), path)
    iltm = parsed(["inference.yaml"], checkpoint=path, **TINY)
    with pytest.raises(CheckpointError, match=r"holds the dense AE/VAE .* layer configs/baseline_dense.yaml last"):
        load_detector(iltm.get_parsed_content("network_def"), path, iltm.get_parsed_content("detector_settings"))
    torch.save(baseline.state_dict(), path)  # no record: PyTorch's key lists, shortened
    with pytest.raises(CheckpointError, match="do not fit") as err:
        load_detector(iltm.get_parsed_content("network_def"), path)
    assert max(len(line) for line in str(err.value).splitlines()) < 400 and "keys)" in str(err.value)
