"""The embedded synthetic datasets: reproducible, exactly labelled, contaminated as asked, anomalies recurring."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections import defaultdict

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from PIL import Image
from scipy import ndimage

from scripts import synthetic as syn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_2D = dict(n_train=6, n_val=2, n_test=4, image_size=32, progress=False)
TINY_3D = dict(n_train=3, n_val=1, n_test=2, grid=(16, 16, 32), progress=False)


def _digests(folder: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _sections(datalist: str) -> dict[str, list[dict]]:
    with open(datalist) as f:
        return json.load(f)


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_same_seed_same_bytes(tmp_path, kind):
    make, tiny = (syn.make_2d, TINY_2D) if kind == "2d" else (syn.make_3d, TINY_3D)
    make(str(tmp_path / "a"), seed=3, **tiny)
    make(str(tmp_path / "b"), seed=3, **tiny)
    make(str(tmp_path / "c"), seed=4, **tiny)
    a, b, c = (_digests(str(tmp_path / k)) for k in "abc")
    assert "preview.png" in a and any(k.startswith("images") for k in a)
    assert a == b
    images = [k for k in a if k.startswith("images")]
    assert all(a[k] != c[k] for k in images)


def test_textures_load_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    syn.texture.cache_clear()
    for category in syn.TEXTURES:
        assert syn.texture(category).shape[0] >= 512


@pytest.mark.parametrize("category", syn.TEXTURES)
def test_2d_mask_is_exactly_the_altered_support(category):
    changed = []
    for idx in range(25):
        normal, image, mask, defects = syn.sample_2d(0, "training", idx, True, category, 48)
        assert image.dtype == np.uint8 and image.shape == (48, 48)
        assert mask.any() and defects
        np.testing.assert_array_equal(image[~mask], normal[~mask])
        changed.append((image[mask] != normal[mask]).mean())
        normal2, image2, mask2, defects2 = syn.sample_2d(0, "training", idx, False, category, 48)
        np.testing.assert_array_equal(normal2, normal)  # anomalous = its normal twin + defects
        np.testing.assert_array_equal(image2, normal)
        assert not mask2.any() and not defects2
    assert np.mean(changed) > 0.8


def test_2d_defect_sizes_scale_with_image():
    for size in (64, 128):
        extents = []
        for idx in range(40):
            _, _, mask, _ = syn.sample_2d(1, "training", idx, True, "brick", size, recurrence=0.5)
            labels, n = ndimage.label(mask)
            for sl in ndimage.find_objects(labels):
                extents.append(max(s.stop - s.start for s in sl) * 64 / size)
        assert 2 <= np.median(extents) <= 20, (size, np.median(extents))


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_2d_fraction_exact_and_masks_match_flags(tmp_path, fraction):
    path = syn.make_2d(
        str(tmp_path), n_train=7, n_val=3, n_test=5, image_size=32, anomalous_fraction=fraction, preview=False
    )
    sections = _sections(path)
    wanted = {"training": round(7 * fraction), "validation": round(3 * fraction), "test": round(5 * 0.5)}
    for section, n in wanted.items():
        entries = sections[section]
        assert sum(e["anomalous"] for e in entries) == n
        for e in entries:
            label = np.asarray(Image.open(tmp_path / e["label"]))
            assert set(np.unique(label)) <= {0, 255}
            assert label.any() == bool(e["anomalous"])


def test_2d_datalist_structure(tmp_path):
    folder = str(tmp_path / "ds")
    path = syn.make_2d(folder, categories="brick,gravel", **TINY_2D)
    assert path == os.path.join(folder, "datalist.json")
    sections = _sections(path)
    assert set(sections) == {"training", "validation", "test"}
    assert [len(sections[k]) for k in ("training", "validation", "test")] == [6, 2, 4]
    for section, entries in sections.items():
        for e in entries:
            assert set(e) == {"image", "label", "category", "anomalous"}
            assert not os.path.isabs(e["image"]) and e["category"] in ("brick", "gravel")
        resolved = load_decathlon_datalist(path, is_segmentation=False, data_list_key=section, base_dir=folder)
        for e in resolved:
            assert os.path.isfile(e["image"]) and os.path.isfile(e["label"])
            img = Image.open(e["image"])
            assert img.mode == "L" and img.size == (32, 32)
    assert {e["category"] for e in sections["training"]} == {"brick", "gravel"}
    with open(os.path.join(folder, "params.json")) as f:
        params = json.load(f)
    assert params["kind"] == "2d" and params["categories"] == ["brick", "gravel"] and params["image_size"] == 32
    assert os.path.isfile(os.path.join(folder, "preview.png"))


def test_2d_defects_recur_across_splits(tmp_path):
    path = syn.make_2d(str(tmp_path), n_train=40, n_val=4, n_test=20, image_size=32, preview=False, progress=False)
    with open(os.path.join(os.path.dirname(path), "anomalies.json")) as f:
        anomalies = json.load(f)
    bank = {d.prototype: d for d in syn.prototype_bank_2d(0, "brick", 32)}
    uses: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for section, entries in anomalies.items():
        for entry in entries:
            for d in entry["defects"]:
                uses[section][d["prototype"]].append(d)
    train, test = uses["training"], uses["test"]
    recurring = sum(len(v) for k, v in train.items() if k >= 0)
    assert recurring >= 0.6 * sum(len(v) for v in train.values())  # recurrence 0.8
    assert max(len(v) for k, v in train.items() if k >= 0) >= 5
    assert {k for k in test if k >= 0} & {k for k in train if k >= 0}  # test anomalies look like training ones
    for k, ds in list(train.items()) + list(test.items()):
        for d in ds if k >= 0 else []:
            p = bank[k]
            assert d["kind"] == p.kind and abs(d["angle"] - p.angle) <= 0.18
            assert 0.89 * p.size <= d["size"] <= 1.11 * p.size


def test_recurrence_zero_and_one():
    for recurrence, expect in ((0.0, {-1}), (1.0, {0, 1, 2, 3})):
        seen = set()
        for idx in range(30):
            seen |= {d.prototype for d in syn.sample_2d(5, "training", idx, True, "gravel", 32, recurrence)[3]}
        assert seen == expect


def test_3d_volumes(tmp_path):
    folder = str(tmp_path / "pet")
    path = syn.make_3d(folder, **TINY_3D)
    sections = _sections(path)
    affine = syn.affine_3d((16, 16, 32), (384, 384, 768))
    assert np.allclose(np.diag(affine)[:3], 24.0)
    assert sum(e["anomalous"] for e in sections["training"]) == 3  # default: every training subject
    assert sum(e["anomalous"] for e in sections["test"]) == 1
    for section in sections:
        for e in load_decathlon_datalist(path, is_segmentation=False, data_list_key=section, base_dir=folder):
            image, label = nib.load(e["image"]), nib.load(e["label"])
            assert image.shape == label.shape == (16, 16, 32)
            assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
            np.testing.assert_allclose(image.affine, affine)
            np.testing.assert_allclose(label.affine, affine)
            lab = np.asarray(label.dataobj)
            assert set(np.unique(lab)) <= {0, 1} and lab.any() == bool(e["anomalous"])
            data = np.asarray(image.dataobj)
            assert data.min() >= 0 and data.max() > 5  # SUV: brain and bladder are hot


def test_3d_lesions_hot_and_local():
    radius = int(4 * 0.7 + 0.5)  # extent of the smoothing kernel (sigma 0.7 voxels, truncate 4)
    for idx in range(6):
        normal, image, mask, lesions = syn.sample_3d(0, "training", idx, True, recurrence=0.5)
        assert image.dtype == np.float32 and image.shape == (32, 32, 64) and mask.any() and lesions
        assert image[mask].mean() > 2.0 * normal[mask].mean()
        assert np.median(image[mask] - normal[mask]) > 1.0
        near = ndimage.binary_dilation(mask, np.ones((3, 3, 3)), iterations=radius)
        np.testing.assert_array_equal(image[~near], normal[~near])  # same subject, same noise elsewhere
        shell = ndimage.binary_dilation(mask, iterations=2) & ~ndimage.binary_dilation(mask)
        assert image[mask].mean() > image[shell].mean()
    normal, image, mask, lesions = syn.sample_3d(0, "training", 0, False)
    assert not mask.any() and not lesions
    np.testing.assert_array_equal(image, normal)


def test_3d_lesions_recur_at_sites():
    bank = syn.prototype_bank_3d(0)
    by_proto = defaultdict(list)
    for idx in range(20):
        for les in syn.sample_3d(0, "test", idx, True, recurrence=1.0, bank=bank)[3]:
            by_proto[les.prototype].append(les)
    assert max(len(v) for v in by_proto.values()) >= 3
    for k, lesions in by_proto.items():
        if k < 0:  # a prototype whose site fell into excluded tissue is replaced by a one-off
            continue
        centers = np.array([les.center for les in lesions])
        assert all(les.site == bank[k].site for les in lesions)
        assert np.abs(centers - centers.mean(0)).max() < 80  # mm: same anatomical site
        assert all(abs(les.uptake / bank[k].uptake - 1) <= 0.11 for les in lesions)


def test_ensure_dataset_generates_once(tmp_path, monkeypatch, caplog):
    folder = str(tmp_path / "data" / "inspection")
    with caplog.at_level("WARNING", logger="scripts.synthetic"):
        path = syn.ensure_dataset(folder, "2d", **TINY_2D)
    assert "no datalist.json there, so the embedded synthetic 2d set is generated" in caplog.text  # a mistyped folder
    assert path == os.path.join(folder, "datalist.json") and os.path.isfile(path)
    assert os.listdir(tmp_path / "data") == ["inspection"]  # no temporary folder left behind
    before = _digests(folder)

    def boom(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr(syn, "make_2d", boom)
    assert syn.ensure_dataset(folder, "2d", **TINY_2D) == path
    assert syn.ensure_dataset(folder) == path  # no explicit params: nothing to disagree with
    assert syn.ensure_dataset(folder, n_train=6, preview=False) == path  # preview changes no image
    assert _digests(folder) == before
    with pytest.raises(ValueError, match="inspection.*n_train"):
        syn.ensure_dataset(folder, "2d", n_train=7)
    with pytest.raises(ValueError, match="kind"):
        syn.ensure_dataset(folder, "3d")


def test_ensure_dataset_failure_leaves_nothing(tmp_path, monkeypatch):
    def killed(out_dir, **kwargs):
        os.makedirs(os.path.join(out_dir, "images"))
        raise KeyboardInterrupt

    monkeypatch.setattr(syn, "make_3d", killed)
    with pytest.raises(KeyboardInterrupt):
        syn.ensure_dataset(str(tmp_path / "pet"), "3d")
    assert os.listdir(tmp_path) == []
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="junk: the folder has files but no datalist.json.*--datalist"):
        syn.ensure_dataset(str(tmp_path / "junk"))


def test_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "scripts.synthetic", "make_2d", "--out_dir", str(out), "--n_train", "4"]
    cmd += ["--n_val", "2", "--n_test", "2", "--image_size", "32", "--anomalous_fraction", "0.5"]
    cmd += ["--categories", "grass,brick", "--preview", "False"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=120)
    sections = _sections(str(out / "datalist.json"))
    assert sum(e["anomalous"] for e in sections["training"]) == 2
    assert {e["category"] for e in sections["training"]} == {"grass", "brick"}
    assert not (out / "preview.png").exists()


def test_mask_recall_groups_training_images_by_their_anomalies(tmp_path) -> None:
    """Masks that cover exactly the tokens of one recurring defect, plus one token outside the labels elsewhere: its
    images score recall 1, the other defect's images are all wholly missed, normal images are never "missed", and
    the false tokens are counted outside the labels; the masks read are those of the run's final model, not the
    untrained pass after an early stop; a dataset that moved since the run still matches."""
    import torch

    from scripts.iltm import tokens_from_map
    from scripts.synthetic.mask_recall import mask_recall

    data = str(tmp_path / "data")
    syn.make_2d(data, **{**TINY_2D, "n_train": 12}, anomalous_fraction=0.75, recurrence=1.0, n_prototypes=2,
                preview=False)  # fmt: skip
    with open(os.path.join(data, "anomalies.json")) as f:
        entries = json.load(f)["training"]
    caught = entries[0]["defects"][0]["prototype"] if entries[0]["defects"] else 0
    final, untrained = {}, {}
    for e in entries:
        label = torch.from_numpy(np.array(Image.open(os.path.join(data, e["image"].replace("images", "labels")))).T)
        truth = tokens_from_map((label > 0)[None, None], (8, 8))[0]
        stray = torch.zeros_like(truth)
        stray[tuple(torch.nonzero(~truth)[0])] = True  # one token outside the labels
        keep = e["defects"] and all(d["prototype"] == caught for d in e["defects"])
        final[os.path.join("/elsewhere/data", e["image"])] = truth if keep else stray
        untrained[os.path.join("/elsewhere/data", e["image"])] = torch.ones_like(truth)
    run = tmp_path / "run"
    for k, masks in ((1, untrained), (2, final), (3, untrained)):  # the loop stopped before training iteration 3
        os.makedirs(run / "iltm" / f"iter_{k:02d}")
        torch.save(masks, run / "iltm" / f"iter_{k:02d}" / "token_masks.pt")
        if k < 3:
            (run / "iltm" / f"iter_{k:02d}" / "model.pt").write_text("a trained detector")
    report = mask_recall(str(run), data)
    assert sum(r["images"] for r in report.values()) == 12
    for name, r in report.items():
        outside = r["images"] * 64 - r["labelled_tokens_per_image"] * r["images"]
        if name == "normal":
            assert r["labelled_tokens_per_image"] == 0 and r["images_missed"] == 0
            assert r["masked_outside_labels"] == pytest.approx(r["images"] / outside)
        elif name.count("#") == 1 and name.endswith(f"#{caught}"):
            assert r["recall"] == 1.0 and r["images_missed"] == 0 and r["masked_outside_labels"] == 0
        elif f"#{caught}" not in name:
            assert r["recall"] == 0.0 and r["images_missed"] == r["images"]
            assert r["masked_outside_labels"] == pytest.approx(r["images"] / outside)
    assert any(name.endswith(f"#{caught}") and name.count("#") == 1 for name in report)
    assert any(f"#{caught}" not in name and name != "normal" for name in report)
    assert "normal" in report
    some = next(name for name in report if name != "normal")
    assert mask_recall(str(run), data, iteration=1)[some]["recall"] == 1.0  # iteration 1's all-ones masks, when asked
    with pytest.raises(FileNotFoundError, match="iteration 4"):
        mask_recall(str(run), data, iteration=4)
    os.makedirs(tmp_path / "plain" / "iltm" / "iter_00")
    (tmp_path / "plain" / "iltm" / "iter_00" / "model.pt").write_text("iteration 0 only")
    with pytest.raises(ValueError, match="the final model is iteration 0, which ILTM computes no masks for"):
        mask_recall(str(tmp_path / "plain"), data)
    with pytest.raises(ValueError, match="^.*run: iteration 0, which"):
        mask_recall(str(run), data, iteration=0)
    # the run's record names its training files: another ratio's folder, with the same file names, is refused
    with open(os.path.join(data, "datalist.json")) as f:
        trained = [{"image": os.path.join("/elsewhere/data", e["image"])} for e in json.load(f)["training"]]
    sizes = {
        e["image"]: [os.path.getsize(os.path.join(data, e["image"][len("/elsewhere/data/") :])), 0] for e in trained
    }
    (run / "run.json").write_text(json.dumps({"training": sizes}))
    assert mask_recall(str(run), data)[some] == report[some]
    other = str(tmp_path / "other")
    syn.make_2d(other, **{**TINY_2D, "n_train": 12, "seed": 5}, anomalous_fraction=0.75, recurrence=1.0, n_prototypes=2,
                preview=False)  # fmt: skip
    with pytest.raises(ValueError, match="not a training image of .*; pass the run's own dataset folder"):
        mask_recall(str(run), other)


def test_a_fraction_outside_0_1_stops_before_any_folder(tmp_path):
    """`make_2d --anomalous_fraction 1.5` left empty image and label folders behind (a new user's pass)."""
    with pytest.raises(ValueError, match=r"anomalous fraction must be in \[0, 1\], got 1.5"):
        syn.make_2d(str(tmp_path / "bad"), n_train=2, n_val=1, n_test=1, anomalous_fraction=1.5, preview=False)
    assert not (tmp_path / "bad").exists()


def test_generating_into_a_finished_dataset_is_refused(tmp_path):
    """Regenerating with a smaller `n_train` used to leave the old images beside the new datalist (a user's pass)."""
    folder = str(tmp_path / "set")
    syn.make_2d(folder, **TINY_2D)
    before = sorted(os.listdir(os.path.join(folder, "images")))
    with pytest.raises(FileExistsError, match="already holds a generated dataset"):
        syn.make_2d(folder, **{**TINY_2D, "n_train": 1})
    assert sorted(os.listdir(os.path.join(folder, "images"))) == before
