"""autoPET preparation on a fabricated miniature of the public NIfTI release: healthy/diseased by SEG content, counts,
ratios, no subject in two splits, determinism, and errors that name the missing file."""

import json
import os
import subprocess
import sys
from collections import Counter

import nibabel as nib
import numpy as np
import pytest

import scripts.prepare_autopet as prep
from scripts.contamination import LayoutError
from scripts.prepare_autopet import main, study_order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (6, 7, 10)
AFFINE = np.diag([3.0, 3.0, 4.0, 1.0])  # mm, like the release's 2-4 mm voxels
SMALL = {"n_train": 6, "n_val": 2, "val_anomalous": 1, "n_test": 4, "test_anomalous": 2, "workers": 2}
RATIOS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# As text 01-03-2010 sorts first; by date the 2005 study is first (real study folders look like these).
EARLY, LATE = "08-12-2005-NA-PET-CT Ganzkoerper  primaer mit KM-10445", "01-03-2010-NA-PET-CT Ganzkoerper-90162"


def _nii(path, array):
    nib.save(nib.Nifti1Image(array, AFFINE), path)


def _study(root, subject, study, diseased, files=("SUV", "CTres", "SEG", "PET", "CT")):
    folder = os.path.join(root, subject, study)
    os.makedirs(folder, exist_ok=True)
    r = np.random.default_rng(abs(hash((subject, study))) % 2**32)
    suv = np.zeros(SHAPE, np.float32)
    suv[1:5, 1:6, 1:9] = r.uniform(0.5, 2.0, (4, 5, 8))  # a "body" in air
    seg = np.zeros(SHAPE, np.uint8)
    if diseased:
        seg[2:4, 2:4, 3:5] = 1
        suv[2:4, 2:4, 3:5] = 12.0
    arrays = {
        "SUV": suv,
        "PET": suv * 1000,
        "CTres": np.full(SHAPE, -100, np.int16),
        "CT": np.full(SHAPE, -100, np.int16),
        "SEG": seg,
    }
    for name in files:
        _nii(os.path.join(folder, f"{name}.nii.gz"), arrays[name])


@pytest.fixture
def autopet(tmp_path):
    root = tmp_path / "FDG-PET-CT-Lesions"
    for i in range(8):
        _study(root, f"PETCT_{i:02d}aa{i}f", f"0{i + 1}-0{i + 1}-2012-NA-PET-CT Ganzkoerper-{i}", diseased=False)
        study = EARLY if i == 0 else f"0{i + 1}-1{i}-2014-NA-PET-CT Ganzkoerper-{i}"
        _study(root, f"PETCT_{i:02d}bb{i}e", study, diseased=True)
    _study(root, "PETCT_00bb0e", LATE, diseased=False)  # a healthy follow-up of a diseased subject
    (root / "Metadata.csv").write_text("not a subject\n")
    return str(root)


def _run(root, out, **kwargs):
    return main(root=root, out=str(out), **{"ratios": RATIOS, **SMALL, **kwargs})


def _load(out, ratio):
    with open(os.path.join(out, f"datalist_autopet_r{ratio:.2f}.json")) as f:
        return json.load(f)


def test_counts_ratios_and_status_from_seg(autopet, tmp_path):
    out = tmp_path / "out"
    rows = _run(autopet, out)
    assert sorted(f for f in os.listdir(out) if f.startswith("datalist_")) == [
        f"datalist_autopet_r{r:.2f}.json" for r in RATIOS
    ]
    assert [r["train_diseased"] for r in rows] == [0, 1, 2, 4, 5, 6]  # round(6 * ratio), halves up
    for ratio in RATIOS:
        d = _load(out, ratio)
        assert len(d["training"]) == 6 and sum(e["anomalous"] for e in d["training"]) == round(6 * ratio + 1e-9)
        assert [e["anomalous"] for e in d["validation"]].count(1) == 1 and len(d["validation"]) == 2
        assert [e["anomalous"] for e in d["test"]].count(1) == 2 and len(d["test"]) == 4
        for e in d["training"] + d["validation"] + d["test"]:
            for key in ("image", "label", "ct"):
                assert not os.path.isabs(e[key]) and os.path.isfile(os.path.join(autopet, e[key]))
            seg = np.asanyarray(nib.load(os.path.join(autopet, e["label"])).dataobj)
            assert e["anomalous"] == int(seg.any()) and e["lesion_voxels"] == int(seg.sum())
            assert e["category"] == "autopet" and e["image"].endswith("/SUV.nii.gz")
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("ratio,train,train_healthy,train_diseased") and len(summary) == 7
    subjects = (out / "subjects.csv").read_text().splitlines()
    assert len(subjects) == 17 and sum(",test" in s for s in subjects) == 4  # one study per subject


def test_one_study_per_subject_chronologically(autopet, tmp_path):
    assert sorted([LATE, EARLY, "no-date"], key=study_order) == [EARLY, LATE, "no-date"]
    first = {s.split(",")[0]: s for s in _subjects(autopet, tmp_path / "first", study="first")}
    last = {s.split(",")[0]: s for s in _subjects(autopet, tmp_path / "last", study="last")}
    assert len(first) == len(last) == 16  # one study per subject
    assert first["PETCT_00bb0e"].startswith(f"PETCT_00bb0e,{EARLY},8,1,")  # diseased baseline
    assert last["PETCT_00bb0e"].startswith(f"PETCT_00bb0e,{LATE},0,0,")  # healthy follow-up
    everything = _subjects(autopet, tmp_path / "all", all_training_studies=True)
    assert len(everything) in (16, 17)  # the follow-up is listed unless its subject is held out for evaluation


def _subjects(root, out, **kwargs):
    _run(root, out, **kwargs)
    return (out / "subjects.csv").read_text().splitlines()[1:]


def test_no_subject_in_two_splits_and_fixed_evaluation_sets(autopet, tmp_path):
    out = tmp_path / "out"
    _run(autopet, out, all_training_studies=True)
    evaluation = None
    for ratio in RATIOS:
        d = _load(out, ratio)
        held_out = {e["subject"] for e in d["validation"] + d["test"]}
        assert len(held_out) == 6 and not held_out & {e["subject"] for e in d["training"]}
        assert evaluation in (None, d["validation"] + d["test"])
        evaluation = d["validation"] + d["test"]


def test_oversampling_is_even_or_an_error_with_counts(autopet, tmp_path):
    rows = _run(autopet, tmp_path / "out")
    d = _load(tmp_path / "out", 1.0)  # 6 diseased from a pool of 5
    assert rows[-1]["diseased_pool"] == 5 and rows[-1]["unique_diseased"] == 5 and rows[-1]["max_repeats"] == 2
    assert sorted(Counter(e["subject"] for e in d["training"]).values()) == [1, 1, 1, 1, 2]
    assert set(e["subject"] for e in _load(tmp_path / "out", 0.4)["training"] if e["anomalous"]) <= set(
        e["subject"] for e in d["training"]
    )  # nested across ratios
    with pytest.raises(LayoutError, match="diseased training subjects .*: 6 needed but only 5 available"):
        _run(autopet, tmp_path / "strict", oversample=False, ratios=1.0)
    with pytest.raises(LayoutError, match="healthy training subjects .*: 6 needed but only 5 available"):
        _run(autopet, tmp_path / "strict", oversample=False, ratios=0.0)
    assert _run(autopet, tmp_path / "strict", oversample=False, ratios=0.2)[0]["max_repeats"] == 1


def test_same_seed_same_bytes_and_seg_read_once(autopet, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _run(autopet, out, seed=1)
    _run(autopet, tmp_path / "other", seed=2)
    first = {f: (out / f).read_bytes() for f in os.listdir(out) if f.startswith(("datalist_", "summary", "subj"))}

    def no_reading(path):
        raise AssertionError(f"{path} read again although cached")

    monkeypatch.setattr(prep, "count_lesion_voxels", no_reading)
    _run(autopet, out, seed=1)
    assert len(first) == 9 and all((out / f).read_bytes() == b for f, b in first.items())
    assert _load(out, 0.4)["test"] != _load(tmp_path / "other", 0.4)["test"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda r: os.remove(f"{r}/PETCT_03bb3e/04-13-2014-NA-PET-CT Ganzkoerper-3/SEG.nii.gz"),
            "PETCT_03bb3e/04-13-2014-NA-PET-CT Ganzkoerper-3/SEG.nii.gz: not found",
        ),
        (
            lambda r: os.remove(f"{r}/PETCT_02aa2f/03-03-2012-NA-PET-CT Ganzkoerper-2/CTres.nii.gz"),
            "PETCT_02aa2f/03-03-2012-NA-PET-CT Ganzkoerper-2/CTres.nii.gz: not found",
        ),
        (lambda r: os.makedirs(f"{r}/PETCT_99empty"), "PETCT_99empty: no study folder"),
        (
            lambda r: open(f"{r}/PETCT_05bb5e/06-15-2014-NA-PET-CT Ganzkoerper-5/SEG.nii.gz", "w").write("x"),
            "SEG.nii.gz: cannot be read as NIfTI",
        ),
        (
            lambda r: _nii(
                f"{r}/PETCT_06bb6e/07-16-2014-NA-PET-CT Ganzkoerper-6/SEG.nii.gz", np.zeros((6, 7, 9), np.uint8)
            ),
            r"SEG.nii.gz: shape \(6, 7, 9\) differs from SUV.nii.gz's",
        ),
    ],
    ids=["no SEG", "no CTres", "subject without study", "broken SEG", "SEG of another shape"],
)
def test_clear_errors_for_partial_folders(autopet, tmp_path, damage, message):
    damage(autopet)
    with pytest.raises(LayoutError, match=message):
        _run(autopet, tmp_path / "out")


def test_every_bad_study_is_named_at_once(autopet, tmp_path):
    """A new user's pass fixed one study per run: two missing SEGs, then three SEGs of another shape."""
    os.remove(f"{autopet}/PETCT_03bb3e/04-13-2014-NA-PET-CT Ganzkoerper-3/SEG.nii.gz")
    os.remove(f"{autopet}/PETCT_02aa2f/03-03-2012-NA-PET-CT Ganzkoerper-2/SEG.nii.gz")
    with pytest.raises(
        LayoutError, match=r"(?s)^2 files not found \(each study folder needs .*PETCT_02aa2f.*PETCT_03bb3e"
    ):
        _run(autopet, tmp_path / "out")
    _study(autopet, "PETCT_03bb3e", "04-13-2014-NA-PET-CT Ganzkoerper-3", diseased=True)
    _study(autopet, "PETCT_02aa2f", "03-03-2012-NA-PET-CT Ganzkoerper-2", diseased=False)
    for i in (4, 5):
        subject = f"PETCT_0{i}bb{i}e/0{i + 1}-1{i}-2014-NA-PET-CT Ganzkoerper-{i}"
        _nii(f"{autopet}/{subject}/SEG.nii.gz", np.zeros((6, 7, 9), np.uint8))
    with pytest.raises(LayoutError, match=r"(?s)^2 SEG files cannot be used:.*PETCT_04bb4e.*differs.*PETCT_05bb5e"):
        _run(autopet, tmp_path / "out")


def test_undated_study_folders_are_named(autopet, tmp_path, caplog):
    _study(autopet, "PETCT_01bb1e", "baseline", diseased=False)
    with caplog.at_level("WARNING", logger="scripts.prepare_autopet"):
        _run(autopet, tmp_path / "out")
    assert "1 study folders of subjects with several studies do not start with a MM-DD-YYYY date" in caplog.text
    assert "PETCT_01bb1e/baseline" in caplog.text


def test_missing_root_wrong_level_and_too_few_subjects(autopet, tmp_path):
    with pytest.raises(LayoutError, match="autoPET folder not found"):
        _run(str(tmp_path / "nowhere"), tmp_path / "out")
    with pytest.raises(LayoutError, match="no PETCT_<subject> folders .*pass .*FDG-PET-CT-Lesions as --root"):
        _run(str(tmp_path), tmp_path / "out")
    with pytest.raises(LayoutError, match="8 diseased subjects, 25 .test. \\+ 10 .validation. needed"):
        main(root=autopet, out=str(tmp_path / "out"))  # the paper's counts need the full release


def test_command_line(autopet, tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "scripts.prepare_autopet",
        "--root",
        autopet,
        "--out",
        str(out),
        "--ratios",
        "0,1.0",
        "--n_train",
        "4",
        "--n_val",
        "2",
        "--val_anomalous",
        "1",
        "--n_test",
        "4",
        "--test_anomalous",
        "2",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "| 1.00 | 4 | 0 | 4 |" in result.stdout and "pass it as --dataset_dir" in result.stdout
    assert sorted(f for f in os.listdir(out) if f.startswith("datalist_")) == [
        "datalist_autopet_r0.00.json",
        "datalist_autopet_r1.00.json",
    ]


def test_preset_preprocesses_prepared_data(autopet, tmp_path, load_preset):
    import torch

    from scripts.data import load_datalist

    _run(autopet, tmp_path / "out", ratios=1.0)
    datalist = str(tmp_path / "out" / "datalist_autopet_r1.00.json")
    grid = [8, 8, 16]  # small stand-in for the preset's 128 x 128 x 256
    parser, preset = load_preset("autopet.yaml", dataset_dir=autopet, datalist=datalist, image_size=grid)
    assert preset["kde_units"] == {"intensity_scale": 1.0, "epsilon": 0.05, "density_threshold": 0.005}
    assert parser.get_parsed_content("density_threshold") == 0.005 and preset["resample_threshold"] == 0.005
    assert preset["image_size"] == [128, 128, 256] and preset["spatial_dims"] == 3
    loading = parser.get_parsed_content("preprocessing")
    entry = load_datalist(datalist, autopet, "test", labels="require")[-1]  # a diseased subject
    item = loading(entry)
    assert item["image"].shape == (1, *grid) and item["label"].shape == (1, *grid)
    assert float(item["image"].max()) == pytest.approx(12.0 / 15.0, abs=0.05)  # SUV / 15
    assert float(item["label"].sum()) > 0 and set(torch.unique(item["label"]).tolist()) == {0.0, 1.0}
    assert torch.allclose(item["image"][item["label"] > 0], torch.tensor(12.0 / 15.0))  # still aligned
    vqvae = parser.get_parsed_content("vqvae_def")
    with torch.no_grad():
        assert vqvae.index_quantize(torch.zeros(1, 1, 16, 16, 32)).shape == (1, 2, 2, 4)  # / 8 per axis
    transformer = parser.get_parsed_content("transformer_def")  # at the stand-in grid: 1 x 1 x 2 tokens
    assert (transformer.max_seq_len, transformer.num_layers, transformer.num_tokens) == (2, 12, 257)
