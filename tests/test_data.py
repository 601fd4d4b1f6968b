"""Bad input stops before training with an error naming the file and the problem; good input of any size loads."""

import contextlib
import io
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from scripts import _cause_last
from scripts.data import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _dataset(tmp_path, n=3, size=(50, 40), rgb=False, labels=True):
    rng = np.random.default_rng(0)
    sections = {}
    for section in ("training", "validation", "test"):
        sections[section] = []
        for i in range(n):
            shape = (*size, 3) if rgb else size
            _png(str(tmp_path / "img" / f"{section}{i}.png"), rng.integers(0, 256, shape, dtype=np.uint8))
            entry = {"image": f"img/{section}{i}.png", "category": "x"}
            if labels:
                mask = np.zeros(size, np.uint8)
                mask[5:10, 5:12] = 255
                _png(str(tmp_path / "lbl" / f"{section}{i}.png"), mask)
                entry["label"] = f"lbl/{section}{i}.png"
            sections[section].append(entry)
    return sections


def _parser(tmp_path, sections, **overrides):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(sections))
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.yaml"))
    parser.update({"bundle_root": ROOT, "dataset_dir": str(tmp_path), "datalist": str(datalist), **overrides})
    return parser


def _error(parser, section="train#dataset#data"):
    """The DataError behind MONAI's "Failed to evaluate" wrapper, and the command line's last line, which must be it:
    the bundle's exception hook walks the chain of causes, so that chain must end (no cycle) at or after it."""
    with pytest.raises(Exception) as info:
        parser.get_parsed_content(section)
    error = info.value
    while not isinstance(error, DataError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, DataError), info.value
    shown = io.StringIO()
    with contextlib.redirect_stderr(shown):
        _cause_last(type(info.value), info.value, info.value.__traceback__, previous=lambda *args: None)
    assert shown.getvalue().strip() == f"Cause: DataError: {error}"
    return str(error)


def test_any_size_is_resized_and_labels_binarised(tmp_path):
    parser = _parser(tmp_path, _dataset(tmp_path, size=(50, 37)))
    files = parser.get_parsed_content("train#dataset#data")
    item = parser.get_parsed_content("preprocessing")(files[0])
    assert tuple(item["image"].shape) == (1, 64, 64)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert set(np.unique(item["label"].numpy())) == {0.0, 1.0}


def test_grey_images_are_repeated_for_an_rgb_bundle_and_rgb_loads(tmp_path):
    for rgb in (False, True):
        parser = _parser(tmp_path, _dataset(tmp_path, rgb=rgb), in_channels=3)
        item = parser.get_parsed_content("preprocessing")(parser.get_parsed_content("train#dataset#data")[0])
        assert tuple(item["image"].shape) == (3, 64, 64)


def test_missing_file(tmp_path):
    sections = _dataset(tmp_path)
    os.remove(tmp_path / "img" / "training1.png")
    message = _error(_parser(tmp_path, sections))
    assert "training1.png" in message and "not found" in message
    for name in ("img/training2.png", "lbl/training0.png"):  # every missing file at once, not one per rerun
        os.remove(tmp_path / name)
    message = _error(_parser(tmp_path, sections))
    assert "3 files of section 'training'" in message and "training2.png: image file not found" in message
    assert "lbl/training0.png: label file not found" in message and "Every image is missing" not in message
    # a datalist whose relative paths belong to another folder than dataset_dir: the likely cause is named
    message = _error(_parser(tmp_path, _dataset(tmp_path), dataset_dir=str(tmp_path / "elsewhere")))
    assert f"resolved against dataset_dir {tmp_path / 'elsewhere'}; pass --dataset_dir" in message


def test_a_missing_file_many_entries_share_is_named_once(tmp_path):
    """prepare_mvtec's normal images share one zero mask: a user's pass saw it listed as "7 files ... not found"."""
    from scripts.data import load_datalist

    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"{i}.png")
    entries = [{"image": f"{i}.png", "label": "zero_masks/gone.png"} for i in range(3)]
    (tmp_path / "list.json").write_text(json.dumps({"training": entries}))
    with pytest.raises(DataError) as err:
        load_datalist(str(tmp_path / "list.json"), str(tmp_path), "training")
    assert str(err.value).count("gone.png: label file not found") == 1 and "files of section" not in str(err.value)


def test_missing_datalist_and_empty_or_absent_section(tmp_path):
    parser = _parser(tmp_path, _dataset(tmp_path))
    parser["datalist"] = str(tmp_path / "nope.json")
    assert "nope.json" in _error(parser)
    (tmp_path / "list.yaml.json").write_text("training:\n  - image: img/training0.png\n")
    parser["datalist"] = str(tmp_path / "list.yaml.json")
    assert "list.yaml.json: not a valid JSON datalist" in _error(parser)
    sections = _dataset(tmp_path)
    sections["validation"] = []
    message = _error(_parser(tmp_path, sections), "validate#dataset#data")
    assert "'validation'" in message and "empty" in message
    sections["valid"] = sections.pop("training")  # a misnamed section: the one there is named
    message = _error(_parser(tmp_path, sections), "validate#dataset#data")
    assert "section 'validation' is missing or empty; it has 'test', 'valid' (did you mean 'valid'?); add it" in message


def test_unreadable_image(tmp_path):
    sections = _dataset(tmp_path)
    (tmp_path / "img" / "training2.png").write_bytes(b"this is not a png")
    message = _error(_parser(tmp_path, sections))
    assert "training2.png" in message and "cannot be loaded" in message


def test_wrong_channel_count(tmp_path):
    sections = _dataset(tmp_path, rgb=True)
    message = _error(_parser(tmp_path, sections, in_channels=1))
    assert "training0.png" in message and "3 channels" in message


def test_palette_and_alpha_images_are_named_with_their_conversion(tmp_path):
    """PIL's reader gives a palette image's colour-table indices as intensities, and alpha as a channel."""
    sections = _dataset(tmp_path, rgb=True)
    rgb = Image.open(tmp_path / "img" / "training1.png")
    rgb.convert("P").save(tmp_path / "img" / "training1.png")
    message = _error(_parser(tmp_path, sections, in_channels=3))
    assert message.startswith(f"{tmp_path / 'img' / 'training1.png'}: a palette image (PIL mode P)")
    assert "convert('L') or 'RGB')" in message
    rgb.convert("RGBA").save(tmp_path / "img" / "training1.png")
    message = _error(_parser(tmp_path, sections, in_channels=3))
    assert "training1.png: has 4 channels" in message and "drop it (PIL: Image.open(path).convert('RGB'))" in message
    message = _error(_parser(tmp_path, sections, in_channels=1))  # a grey model: converted to RGB, it would not fit
    assert "training1.png: has 4 channels" in message and "drop it (PIL: Image.open(path).convert('L'))" in message
    rgb.convert("P").save(tmp_path / "lbl" / "training1.png")  # a label's palette indices are its classes: fine
    rgb.save(tmp_path / "img" / "training1.png")
    _parser(tmp_path, sections, in_channels=3).get_parsed_content("train#dataset#data")


def test_wrong_dimensionality(tmp_path):
    sections = _dataset(tmp_path)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(tmp_path / "img" / "vol.nii.gz"))
    sections["training"][0]["image"] = "img/vol.nii.gz"
    message = _error(_parser(tmp_path, sections))
    assert "vol.nii.gz" in message and "3 spatial dimensions" in message


def test_nan_and_inf(tmp_path):
    sections = _dataset(tmp_path)
    for name, value in (("nan.nii.gz", np.nan), ("inf.nii.gz", np.inf)):
        volume = np.zeros((8, 8, 8), np.float32)
        volume[2, 3, 4] = value
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "img" / name))
    for name in ("nan.nii.gz", "inf.nii.gz"):
        sections["training"] = [{"image": f"img/{name}"}]
        message = _error(_parser(tmp_path, sections, spatial_dims=3, image_size=[8, 8, 8]))
        assert name in message and "NaN or Inf" in message


def test_label_shape_mismatch(tmp_path):
    sections = _dataset(tmp_path)
    _png(str(tmp_path / "lbl" / "small.png"), np.zeros((20, 20), np.uint8))
    sections["training"][1]["label"] = "lbl/small.png"
    message = _error(_parser(tmp_path, sections))
    assert "small.png" in message and "does not match" in message


def test_a_label_elsewhere_in_space_and_a_single_slice_are_refused(tmp_path):
    """A mask of its image's shape saved in another frame was scored as if aligned (a new user's 3D pass: identical
    metrics with the label 60 mm away), and a one-slice volume was stretched to a volume and its maps saved 2D."""
    affine = np.diag([3.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [-40, -50, 10]
    moved = affine.copy()
    moved[0, 3] += 60
    os.makedirs(tmp_path / "img")
    for name, shape, frame in (("pet", (8, 8, 6), affine), ("seg", (8, 8, 6), moved), ("near", (8, 8, 6), affine + 1e-4),
                               ("slab", (8, 8, 1), affine)):  # fmt: skip
        data = np.zeros(shape, np.float32) if name in ("seg", "near") else np.ones(shape, np.float32)
        nib.save(nib.Nifti1Image(data, frame), str(tmp_path / "img" / f"{name}.nii.gz"))
    settings = {"spatial_dims": 3, "image_size": [8, 8, 8], "intensity_max": 1.0}
    sections = {"training": [{"image": "img/pet.nii.gz", "label": "img/seg.nii.gz"}]}
    message = _error(_parser(tmp_path, sections, **settings))
    assert message.startswith(
        f"{tmp_path / 'img' / 'seg.nii.gz'}: its affine differs from its image's (origin "
        "[20.0, -50.0, 10.0], voxel size [3.0, 3.0, 4.0]; the image's [-40.0, -50.0, 10.0]"
    )
    assert "Resample the labels onto their images' grids" in message
    sections = {"training": [{"image": "img/pet.nii.gz", "label": "img/near.nii.gz"}]}  # header round-off: accepted
    assert len(_parser(tmp_path, sections, **settings).get_parsed_content("train#dataset#data")) == 1
    message = _error(_parser(tmp_path, {"training": [{"image": "img/slab.nii.gz"}]}, **settings))
    assert "slab.nii.gz: a single slice (shape (8, 8, 1)), not a volume" in message


def test_test_entries_must_carry_labels_and_training_labels_are_optional(tmp_path):
    from scripts.data import load_datalist

    sections = _dataset(tmp_path)
    del sections["training"][0]["label"]
    del sections["test"][1]["label"]
    (tmp_path / "d.json").write_text(json.dumps(sections))
    training = load_datalist(str(tmp_path / "d.json"), str(tmp_path), "training")
    assert all("label" not in e for e in training)  # partial labels dropped so that batches collate
    with pytest.raises(DataError, match=r"d.json: entry 1 of 'test' \(.*test1.png\) has no 'label'"):
        load_datalist(str(tmp_path / "d.json"), str(tmp_path), "test", labels="require")
    for entry in sections["test"]:
        entry.pop("label", None)
    (tmp_path / "d.json").write_text(json.dumps(sections))
    with pytest.raises(
        DataError, match=r"d.json: 3 of the 3 entries of 'test' \(the first: entry 0, .*test0.png\) have no 'label'\. "
    ):
        load_datalist(str(tmp_path / "d.json"), str(tmp_path), "test", labels="require")


def test_only_path_fields_are_joined_with_the_dataset_dir(tmp_path):
    from scripts.data import load_datalist

    sections = _dataset(tmp_path)
    (tmp_path / "x").mkdir()  # a folder named like the category must not turn the category into a path
    (tmp_path / "d.json").write_text(json.dumps(sections))
    entry = load_datalist(str(tmp_path / "d.json"), str(tmp_path), "training")[0]
    assert entry["category"] == "x"
    assert entry["image"] == os.path.join(str(tmp_path), "img", "training0.png")


def test_every_bad_entry_is_named_at_once_and_logged_once(tmp_path, caplog):
    sections = _dataset(tmp_path)
    _png(str(tmp_path / "lbl" / "small.png"), np.zeros((20, 20), np.uint8))
    sections["training"][1]["label"] = "lbl/small.png"
    (tmp_path / "img" / "training2.png").write_bytes(b"this is not a png")
    (tmp_path / "img" / "validation0.png").write_bytes(b"nor is this")  # named in the same run (a new user's pass)
    with caplog.at_level("ERROR", logger="scripts.data"):
        message = _error(_parser(tmp_path, sections))
    lines = message.splitlines()
    assert lines[0] == "3 of 6 entries cannot be used:"
    assert "small.png" in lines[1] and "does not match" in lines[1] and "training2.png" in lines[2]
    assert "validation0.png" in lines[3]
    assert [r.getMessage() for r in caplog.records if r.name == "scripts.data"] == [message]
    _png(str(tmp_path / "img" / "validation0.png"), np.zeros((50, 40), np.uint8))
    parser = _parser(tmp_path, {**sections, "training": sections["validation"]})
    assert len(parser.get_parsed_content("train#dataset#data")) == 3
    from monai.transforms import Compose

    from scripts import data

    transform = parser.get_parsed_content("preprocessing")
    assert len(data._checked[transform]) == 3  # the validation section, once, for the check of its own that follows
    assert data.check_data([{"image": "nowhere.png"}], Compose([]), "a transform of its own") == [
        {"image": "nowhere.png"}
    ]


def test_the_command_line_cause_survives_a_cyclic_chain():
    """Any library may close a chain of causes into a loop; the exception hook still ends, with the bundle's error."""
    inner = RuntimeError("applying transform")
    error = DataError("x.png: has 3 channels")
    inner.__cause__, error.__cause__ = error, inner
    outer = RuntimeError("Failed to evaluate")
    outer.__cause__ = inner
    shown = io.StringIO()
    with contextlib.redirect_stderr(shown):
        _cause_last(RuntimeError, outer, None, previous=lambda *args: None)
    assert shown.getvalue().strip() == "Cause: DataError: x.png: has 3 channels"
    shown, traced = io.StringIO(), []
    with contextlib.redirect_stderr(shown):  # Ctrl-C: the way on, not a traceback
        _cause_last(KeyboardInterrupt, KeyboardInterrupt(), None, previous=lambda *args: traced.append(args))
    assert shown.getvalue().startswith("\nInterrupted. The same command again goes on from there") and not traced


def test_labels_on_some_entries_of_a_section_are_named_as_unused(tmp_path, caplog, monkeypatch):
    """Labels reach the checks only when every entry of a section has one: a partly labelled section says so."""
    import logging

    from scripts.data import load_datalist

    monkeypatch.setattr(logging.getLogger("scripts.data"), "disabled", False)  # logging.conf of an earlier run
    sections = _dataset(tmp_path)
    del sections["validation"][1]["label"]
    (tmp_path / "partial.json").write_text(json.dumps(sections))
    with caplog.at_level(logging.WARNING, logger="scripts.data"):
        entries = load_datalist(str(tmp_path / "partial.json"), str(tmp_path), "validation")
    assert not any("label" in e for e in entries)
    assert "2 of 3 entries of section 'validation' have a label" in caplog.text and "Label every entry" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scripts.data"):
        assert all("label" in e for e in load_datalist(str(tmp_path / "partial.json"), str(tmp_path), "training"))
    assert caplog.text == ""
    for entry in sections["test"]:  # masks under another key than 'label' would go unread without a word
        entry["mask"] = entry.pop("label")
    (tmp_path / "renamed.json").write_text(json.dumps(sections))
    with caplog.at_level(logging.WARNING, logger="scripts.data"):
        load_datalist(str(tmp_path / "renamed.json"), str(tmp_path), "test")
    assert "section 'test' has entries without 'label' but 'mask': the bundle reads masks from 'label'" in caplog.text
    with pytest.raises(
        DataError, match="have no 'label' but 'mask': the bundle reads masks from 'label' alone; rename"
    ):
        load_datalist(str(tmp_path / "renamed.json"), str(tmp_path), "test", labels="require")


def test_a_label_of_many_grey_levels_is_warned_about_once(caplog) -> None:
    """A JPEG mask's noise counts as anomaly above the default threshold 0: said once, with the remedy."""
    from monai.data import MetaTensor

    from scripts.data import BinarizeLabeld

    binarize = BinarizeLabeld("label")
    classes = torch.tensor([0.0, 1.0, 2.0, 4.0]).repeat_interleave(4).reshape(1, 4, 4)  # a label of a few classes
    binary = torch.zeros(1, 4, 4)
    binary[0, 1, 1] = 255
    with caplog.at_level("WARNING", logger="scripts.data"):
        assert binarize({"label": classes})["label"].sum() == 12 and binarize({"label": binary})["label"].sum() == 1
        assert not caplog.records
        noisy = MetaTensor(torch.arange(16.0).reshape(1, 4, 4), meta={"filename_or_obj": "mask_07.jpg"})
        assert binarize({"label": noisy})["label"].sum() == 15  # still every voxel above the threshold
        binarize({"label": noisy})
    (record,) = caplog.records
    assert (
        "mask_07.jpg: a label of 16 grey levels (0-15)" in record.message and "--label_threshold 127" in record.message
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="scripts.data"):  # the remedy taken: the levels said, not the advice
        BinarizeLabeld("label", threshold=7.0)({"label": noisy})
    (record,) = caplog.records
    assert "above label_threshold 7 is anomalous, 50.0% of this one. Said" in record.message


def test_a_label_anomalous_everywhere_is_warned_about_once(caplog) -> None:
    """A mask whose background is 1 (crack = 2) reads as all defect: said once, naming the file and the threshold."""
    from monai.data import MetaTensor

    from scripts.data import BinarizeLabeld

    binarize = BinarizeLabeld("label")
    background_one = MetaTensor(torch.ones(1, 4, 4), meta={"filename_or_obj": "crack_003.png"})
    background_one[0, 2, :] = 2
    with caplog.at_level("WARNING", logger="scripts.data"):
        assert binarize({"label": torch.tensor([[[0.0, 2.0], [1.0, 1.0]]])})["label"].sum() == 3  # some normal voxel
        assert not caplog.records
        assert binarize({"label": background_one})["label"].sum() == 16
        binarize({"label": background_one})
    (record,) = caplog.records
    assert "crack_003.png: every voxel of this label is anomalous" in record.message
    assert "--label_threshold 1" in record.message
    assert BinarizeLabeld("label", threshold=1.0)({"label": background_one})["label"].sum() == 4  # the remedy works


def test_the_intensity_band_is_that_of_the_raw_images(tmp_path) -> None:
    """Percentiles of the files' own intensities, before any scaling: what --intensity_min/max would be set to."""
    from scripts.data import intensity_band

    rng = np.random.default_rng(0)
    entries = []
    for i in range(4):
        path = tmp_path / f"patch_{i}.png"
        Image.fromarray(rng.integers(90, 191, size=(32, 32)).astype(np.uint8)).save(path)
        entries.append({"image": str(path)})
    low, high, top = intensity_band(entries)
    assert 90 <= low < 92 and 188 < high <= 190 and top == 190
