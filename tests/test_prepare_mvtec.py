"""MVTec AD preparation on a fabricated miniature of the official layout: counts, ratios, exclusions, no leakage,
determinism, and errors that name the missing file."""

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from scripts.contamination import LayoutError, check_no_leakage, count_at_ratio, draw, parse_ratios, rng
from scripts.prepare_mvtec import main, scan_category

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, N_TEST_GOOD = 12, 14
DEFECTS = {"crack": 9, "scratch": 8}  # 17 anomalous: 10 test + 3 validation (defaults) + a pool of 4
RATIOS = (0.0, 0.2, 0.4, 0.8)


def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _category(root, name, rgb=True, size=(8, 10), n_train=N_TRAIN, n_good=N_TEST_GOOD, defects=DEFECTS):
    """`<name>/train/good`, `<name>/test/<good|defect>`, `<name>/ground_truth/<defect>/<stem>_mask.png`."""
    r = np.random.default_rng(len(name))
    shape = (*size, 3) if rgb else size
    for i in range(n_train):
        _png(f"{root}/{name}/train/good/{i:03d}.png", r.integers(0, 256, shape, dtype=np.uint8))
    for i in range(n_good):
        _png(f"{root}/{name}/test/good/{i:03d}.png", r.integers(0, 256, shape, dtype=np.uint8))
    for defect, n in defects.items():
        for i in range(n):
            _png(f"{root}/{name}/test/{defect}/{i:03d}.png", r.integers(0, 256, shape, dtype=np.uint8))
            mask = np.zeros(size, np.uint8)
            mask[2:5, 3:6] = 255
            _png(f"{root}/{name}/ground_truth/{defect}/{i:03d}_mask.png", mask)


@pytest.fixture
def mvtec(tmp_path):
    root = tmp_path / "mvtec"
    _category(root, "bottle", rgb=True)
    _category(root, "grid", rgb=False, size=(6, 6))
    _category(root, "toothbrush", rgb=True, defects={"defective": 2})  # excluded by default: too few anomalies
    (root / "license.txt").write_text("not a category")
    return str(root)


def _run(root, out, **kwargs):
    kwargs.setdefault("ratios", RATIOS)
    return main(root=root, out=str(out), **kwargs)


def _load(out, category, ratio):
    with open(os.path.join(out, f"datalist_{category}_r{ratio:.2f}.json")) as f:
        return json.load(f)


def test_counts_ratios_and_exclusions(mvtec, tmp_path):
    out = tmp_path / "out"
    rows = _run(mvtec, out)
    names = sorted(f for f in os.listdir(out) if f.startswith("datalist_"))
    assert names == sorted(f"datalist_{c}_r{r:.2f}.json" for c in ("bottle", "grid") for r in RATIOS)
    assert len(rows) == 8 and (out / "summary.csv").is_file() and (out / "summary.md").is_file()
    for category in ("bottle", "grid"):
        for ratio in RATIOS:
            d = _load(out, category, ratio)
            train = d["training"]
            assert len(train) == N_TRAIN
            assert sum(e["anomalous"] for e in train) == count_at_ratio(N_TRAIN, ratio) == round(N_TRAIN * ratio)
            assert [e["anomalous"] for e in d["validation"]].count(1) == 3 and len(d["validation"]) == 5
            assert [e["anomalous"] for e in d["test"]].count(1) == 10 and len(d["test"]) == 20
            assert {e["category"] for s in ("training", "validation", "test") for e in d[s]} == {category}
            assert {e["defect"] for e in d["test"]} == {"good", *DEFECTS}  # every defect type is tested
            assert all(e["defect"] == "good" for e in train if not e["anomalous"])
            assert all(e["image"].startswith(f"{category}/train/good/") for e in train if not e["anomalous"])
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("category,ratio,train,train_normal,train_anomalous")
    assert "bottle,0.80,12,2,10,4,4,3," in summary[4]  # 10 anomalous from a pool of 4: each 2 or 3 times


def test_labels_resolve_from_the_root_and_match_their_images(mvtec, tmp_path):
    out = tmp_path / "out"
    _run(mvtec, out, ratios=0.4)
    for category, size in (("bottle", (10, 8)), ("grid", (6, 6))):
        d = _load(out, category, 0.4)
        for section in ("training", "validation", "test"):
            for e in d[section]:
                image, label = os.path.join(mvtec, e["image"]), os.path.join(mvtec, e["label"])
                assert not os.path.isabs(e["image"]) and not os.path.isabs(e["label"])
                with Image.open(image) as img, Image.open(label) as lbl:
                    assert img.size == lbl.size == size
                    assert (np.asarray(lbl).max() > 0) == bool(e["anomalous"])
    assert sorted(os.listdir(out / "zero_masks")) == ["bottle_10x8.png", "grid_6x6.png"]  # one per category/size


def test_no_leakage_and_pool(mvtec, tmp_path):
    out = tmp_path / "out"
    _run(mvtec, out, ratios=RATIOS + (1.0,))
    for ratio in RATIOS + (1.0,):
        d = _load(out, "bottle", ratio)
        evaluation = {e["image"] for s in ("validation", "test") for e in d[s]}
        assert not evaluation & {e["image"] for e in d["training"]}
        assert len(evaluation) == 25
    with pytest.raises(AssertionError, match="in both training and test"):
        check_no_leakage({"training": d["test"][:1], "validation": [], "test": d["test"]}, "leaky")


def test_nested_sets_and_even_oversampling(mvtec, tmp_path):
    out = tmp_path / "out"
    _run(mvtec, out)
    anomalous = {r: [e["image"] for e in _load(out, "bottle", r)["training"] if e["anomalous"]] for r in RATIOS}
    normal = {r: {e["image"] for e in _load(out, "bottle", r)["training"] if not e["anomalous"]} for r in RATIOS}
    assert set(anomalous[0.2]) <= set(anomalous[0.4]) <= set(anomalous[0.8])
    assert normal[0.8] <= normal[0.4] <= normal[0.2] <= normal[0.0]
    assert len(set(anomalous[0.2])) == len(anomalous[0.2]) == 2  # the pool suffices: no repeats
    assert sorted(Counter(anomalous[0.4]).values()) == [1, 1, 1, 2]  # 5 from a pool of 4: one repeat
    repeats = Counter(anomalous[0.8]).values()
    assert len(repeats) == 4 and max(repeats) - min(repeats) <= 1 and sum(repeats) == 10
    picked = draw(list(range(3)), 7, rng(0, "x"), "items")
    assert sorted(Counter(picked).values()) == [2, 2, 3]
    with pytest.raises(LayoutError, match="5 needed but only 4 available"):
        _run(mvtec, tmp_path / "strict", oversample=False, categories="bottle")


def test_same_seed_same_bytes_other_seed_other_split(mvtec, tmp_path):
    _run(mvtec, tmp_path / "a", seed=3)
    first = {f: (tmp_path / "a" / f).read_bytes() for f in os.listdir(tmp_path / "a") if f.endswith((".json", ".csv"))}
    _run(mvtec, tmp_path / "a", seed=3)
    _run(mvtec, tmp_path / "c", seed=4)
    assert len(first) == 10 and all((tmp_path / "a" / f).read_bytes() == b for f, b in first.items())
    assert _load(tmp_path / "a", "bottle", 0.4)["test"] != _load(tmp_path / "c", "bottle", 0.4)["test"]
    assert _load(tmp_path / "a", "bottle", 0.4)["test"] == _load(tmp_path / "a", "bottle", 0.8)["test"]
    # another seed beside them would train on this folder's test images: refused; more ratios are not
    with pytest.raises(LayoutError, match="other settings .seed: 3 there, 4 now.; use another --out"):
        _run(mvtec, tmp_path / "a", seed=4)
    _run(mvtec, tmp_path / "a", seed=3, ratios="0.6")
    # a run that stopped before writing any datalist leaves nothing to protect
    with pytest.raises(LayoutError):
        _run(mvtec, tmp_path / "d", seed=3, oversample=False, categories="bottle")
    _run(mvtec, tmp_path / "d", seed=4, categories="bottle")


def test_copy_resizes_into_the_output_folder(mvtec, tmp_path):
    out = tmp_path / "out"
    _run(mvtec, out, ratios="0.2", size=16, copy=True, categories="grid")
    assert sorted(f for f in os.listdir(out) if f.startswith("datalist_")) == ["datalist_grid_r0.20.json"]
    with pytest.raises(LayoutError, match="toothbrush: 2 anomalous test images, 10 .test. \\+ 3"):
        _run(mvtec, tmp_path / "o2", exclude="")  # why the paper leaves it out
    d = _load(out, "grid", 0.2)
    for e in d["training"] + d["test"]:
        assert e["image"].startswith("images/grid/") and not os.path.isabs(e["image"])
        with Image.open(out / e["image"]) as img, Image.open(out / e["label"]) as lbl:
            assert img.size == lbl.size == (16, 16)
            assert set(np.unique(np.asarray(lbl))) <= {0, 255}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: os.remove(f"{r}/bottle/ground_truth/crack/003_mask.png"), "crack/003_mask.png: mask of anomalous"),
        (lambda r: os.makedirs(f"{r}/empty"), "empty/train/good: folder not found"),
        (
            lambda r: [os.remove(f"{r}/grid/train/good/{f}") for f in os.listdir(f"{r}/grid/train/good")],
            "grid/train/good: no PNG images",
        ),
        (lambda r: _png(f"{r}/bottle/ground_truth/crack/001_mask.png", np.zeros((3, 3), np.uint8)), "differs"),
    ],
    ids=["missing mask", "empty category", "no training images", "mask size"],
)
def test_clear_errors_for_partial_folders(mvtec, tmp_path, damage, message):
    damage(mvtec)
    with pytest.raises(LayoutError, match=message):
        _run(mvtec, tmp_path / "out")


def test_what_a_rerun_or_the_root_could_change_is_refused_or_resolved(mvtec, tmp_path, caplog):
    """A user's pass: images copied again at another size replaced those of the datalists already there; a root
    reached through a symlink gave zero-mask paths that climbed out of the link's target; an excluded category asked
    for by name ended in a traceback; normal images repeated without a word."""
    out = tmp_path / "copies"
    _run(mvtec, out, ratios="0.2", size=16, copy=True, categories="grid")
    for other in ({"size": 12, "copy": True}, {"copy": False}):
        with pytest.raises(LayoutError, match="holds datalists drawn with other settings .*use another --out"):
            _run(mvtec, out, ratios="0.4", categories="grid", **other)
    with Image.open(out / _load(out, "grid", 0.2)["training"][0]["image"]) as img:
        assert img.size == (16, 16)
    older = json.loads((out / "protocol.json").read_text())  # a folder prepared before 0.7.7: told by its files
    (out / "protocol.json").write_text(json.dumps({k: v for k, v in older.items() if k not in ("copy", "size")}))
    with pytest.raises(LayoutError, match="holds datalists prepared with other copies .size: 16 there, 12 now"):
        _run(mvtec, out, ratios="0.4", categories="grid", size=12, copy=True)
    (tmp_path / "links" / "deep").mkdir(parents=True)
    linked = tmp_path / "links" / "deep" / "mvtec"
    linked.symlink_to(mvtec)
    _run(str(linked), tmp_path / "via_link", ratios="0.4", categories="grid")
    for e in _load(tmp_path / "via_link", "grid", 0.4)["training"]:
        assert os.path.isfile(os.path.join(str(linked), e["label"])), e["label"]  # as the bundle joins them
    with pytest.raises(LayoutError, match="toothbrush: asked for with --categories but excluded .*--exclude ''"):
        _run(mvtec, tmp_path / "tb", categories="toothbrush")
    with caplog.at_level("WARNING", logger="scripts.prepare_mvtec"):
        _run(mvtec, tmp_path / "big", ratios="0", categories="grid", train_size=N_TRAIN + 3)
    assert f"{N_TRAIN + 3} normal training images from the {N_TRAIN} in train/good, so some repeat" in caplog.text


def test_every_bad_mask_of_a_category_is_named_at_once(mvtec, tmp_path):
    os.remove(f"{mvtec}/bottle/ground_truth/crack/003_mask.png")
    _png(f"{mvtec}/bottle/ground_truth/crack/001_mask.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(LayoutError, match=r"(?s)bottle: 2 problems.*001_mask.png: mask size .*003_mask.png: mask of"):
        _run(mvtec, tmp_path / "out")


def test_missing_root_and_categories(tmp_path, mvtec):
    with pytest.raises(LayoutError, match="MVTec AD folder not found"):
        _run(str(tmp_path / "nowhere"), tmp_path / "out")
    with pytest.raises(LayoutError, match="carpet: category folder not found; .* holds bottle, grid, toothbrush"):
        _run(mvtec, tmp_path / "out", categories="carpet")
    with pytest.raises(LayoutError, match="bottle: 14 images in test/good, 18 .test. \\+ 2 .* lower --n_test"):
        _run(mvtec, tmp_path / "out", categories="bottle", n_test=20, test_anomalous=2)
    with pytest.raises(LayoutError, match="bottle: a category folder .*; pass the folder above it as --root and "
                                         "--categories bottle"):  # fmt: skip
        _run(os.path.join(mvtec, "bottle"), tmp_path / "out")
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        parse_ratios("0,1.5")
    assert parse_ratios("0.4,0,0.2") == parse_ratios((0, 0.2, 0.4)) == parse_ratios("[0.2, 0.4, 0]") == (0, 0.2, 0.4)
    with pytest.raises(ValueError, match="0.333, 0.334 share a file name"):  # both would be written as r0.33
        parse_ratios("0.333,0.334")


def test_a_failed_preparation_binds_what_it_left_and_summaries_list_every_datalist(mvtec, tmp_path):
    """A ratio whose pool runs dry leaves no datalist of its category; a category written before the failing one
    records the split it was drawn with, so that a rerun with other split sizes cannot put beside its datalists
    others whose training images are its test images."""
    out = tmp_path / "out"
    with pytest.raises(LayoutError, match="anomalous training images"):  # pools of 4 and no oversampling
        _run(mvtec, out, categories="bottle", ratios="0,0.8", oversample=False)
    assert not list(out.glob("datalist_*.json")) and not (out / "protocol.json").exists()
    assert not (out / "zero_masks").exists()  # the failing draw comes before any file is written
    _category(mvtec, "wood", defects={"knot": 13})  # no pool at all: the category after bottle fails
    with pytest.raises(LayoutError, match="wood: anomalous training images"):
        _run(mvtec, out, categories="bottle,wood", ratios="0,0.2")
    assert sorted(p.name for p in out.glob("datalist_*.json")) == [
        "datalist_bottle_r0.00.json",
        "datalist_bottle_r0.20.json",
    ]
    assert "| bottle | 0.00 |" in (out / "summary.md").read_text()  # the summary lists what the failed run left
    with pytest.raises(LayoutError, match="other settings .n_test: 20 there, 12 now"):
        _run(mvtec, out, categories="bottle", ratios="0.2", n_test=12)
    _run(mvtec, out, categories="bottle", ratios="0.2")
    _run(mvtec, out, categories="bottle,grid", ratios="0.4")  # a later call adds to the summary
    summary = (out / "summary.md").read_text()
    listed = (("bottle", "0.00"), ("bottle", "0.20"), ("bottle", "0.40"), ("grid", "0.40"))
    assert all(f"| {c} | {r} |" in summary for c, r in listed) and summary.count("| bottle |") == 3


def test_uppercase_extensions_and_other_images(mvtec, tmp_path, caplog):
    """000.PNG has its mask in 000_mask.PNG; a JPEG beside the PNGs is named, not dropped without a word."""
    crack = os.path.join(mvtec, "bottle", "test", "crack")
    os.rename(os.path.join(crack, "000.png"), os.path.join(crack, "000.PNG"))
    masks = os.path.join(mvtec, "bottle", "ground_truth", "crack")
    os.rename(os.path.join(masks, "000_mask.png"), os.path.join(masks, "000_mask.PNG"))
    Image.new("RGB", (10, 8)).save(os.path.join(mvtec, "bottle", "train", "good", "extra.jpg"))
    with caplog.at_level("WARNING", logger="scripts.prepare_mvtec"):
        _run(mvtec, tmp_path / "out", categories="bottle", ratios="0")
    assert "1 image(s) not in PNG left out (extra.jpg)" in caplog.text
    first = scan_category(mvtec, "bottle").test_defects["crack"][0]
    assert (first.image, first.label) == ("bottle/test/crack/000.PNG", "bottle/ground_truth/crack/000_mask.PNG")


def test_command_line(mvtec, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "scripts.prepare_mvtec", "--root", mvtec, "--out", str(out), "--ratios", "0,0.4"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "| bottle | 0.40 |" in result.stdout and "pass it as --dataset_dir" in result.stdout
    assert (out / "datalist_grid_r0.40.json").is_file() and not (out / "datalist_grid_r0.20.json").exists()


def test_preset_loads_prepared_data(mvtec, tmp_path, load_preset):
    import torch

    from scripts.data import load_datalist

    out = tmp_path / "out"
    _run(mvtec, out, ratios=0.4)
    datalist = str(out / "datalist_grid_r0.40.json")
    parser, preset = load_preset("mvtec.yaml", dataset_dir=mvtec, datalist=datalist)
    assert parser.get_parsed_content("kde_epsilon") == pytest.approx(12.75 / 255) and preset["image_size"] == [256, 256]
    assert parser.get_parsed_content("density_threshold") == pytest.approx(0.005 * 255)
    assert (preset["num_samples"], preset["num_decodes"], preset["iltm#threshold_decay"]) == (60, 5, 0.125)
    loading = parser.get_parsed_content("preprocessing")
    for section in ("training", "test"):
        entries = load_datalist(datalist, mvtec, section, labels="require")
        item = loading(entries[-1])  # the last entry is anomalous; grey images become 3 channels
        assert item["image"].shape == (3, 256, 256) and item["label"].shape == (1, 256, 256)
        assert 0 <= float(item["image"].min()) and float(item["image"].max()) <= 1
        assert float(item["label"].max()) == 1.0
    vqvae = parser.get_parsed_content("vqvae_def")
    with torch.no_grad():
        assert vqvae.index_quantize(torch.zeros(1, 3, 64, 64)).shape == (1, 8, 8)  # / 8: 256 x 256 -> 32 x 32
    transformer = parser.get_parsed_content("transformer_def")
    assert (transformer.max_seq_len, transformer.num_layers, transformer.num_tokens) == (1024, 12, 257)
