"""configs/inference.yaml and configs/evaluate.yaml: self-contained, the same detector as training, presets layer on
them, MONAI Label's way of loading works, and the outputs (maps, overlays, metrics.json, per-image CSV) are right.

Everything runs a tiny random detector on a tiny synthetic set (seconds); the exact `verify_net_in_out` command
with the default sizes takes minutes on CPU and runs only with RUN_SLOW=1.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle import run as bundle_run
from monai.bundle import verify_net_in_out
from monai.transforms import LoadImaged, SaveImaged
from PIL import Image
from tiny import TINY_DETECTOR

from scripts import metrics
from scripts.checkpoint import detector_record, save_detector
from scripts.evaluation import summarise
from scripts.inference import AnomalyInferer, output_name
from scripts.synthetic import make_2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
INFERENCE = os.path.join(CONFIGS, "inference.yaml")
EVALUATE = os.path.join(CONFIGS, "evaluate.yaml")
PRESETS = ("demo", "demo3d", "mvtec", "autopet")
run_slow = pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="slow (minutes on CPU); set RUN_SLOW=1")

TINY = TINY_DETECTOR
# ids training and inference must define identically (the detector and everything its input depends on): raw, and
# those inference.yaml reads through `@trained` (a checkpoint's record, see scripts/checkpoint.py) by their values
SHARED = (
    "latent_shape", "network_def", "kde_epsilon", "density_threshold", "spatial", "seed", "amp", "device",
    "bundle_root", "dataset_dir", "synthetic", "output_dir", "detector_settings",
)  # fmt: skip
SHARED_VALUES = (
    "vqvae_def", "transformer_def", "num_samples", "num_decodes", "resample_threshold", "kde_units",
    "restrict_to_flags", "flag_neighbourhood", "spatial_dims", "in_channels", "image_size", "intensity_min",
    "intensity_max", "label_threshold",
)  # fmt: skip


def assert_same_detector(infer: ConfigParser, train: ConfigParser) -> None:
    for key in SHARED:
        assert infer[key] == train[key], key
    for key in SHARED_VALUES:
        ours, theirs = (p.get_parsed_content(key) for p in (infer, train))
        if isinstance(ours, torch.nn.Module):  # the networks: their constructor settings
            ours, theirs = ours.settings, theirs.settings
        assert ours == theirs, key


def parser(*files: str, **overrides) -> ConfigParser:
    p = ConfigParser()
    p.read_config([f if os.path.isabs(f) else os.path.join(CONFIGS, f) for f in files])
    for k, v in overrides.items():
        p[k] = v
    return p


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """A tiny labelled set (48 px, so that inverted maps differ in size from the network's 32 px)."""
    out = str(tmp_path_factory.mktemp("data"))
    make_2d(out, n_train=2, n_val=1, n_test=4, image_size=48, categories=("brick", "grass"), preview=False)
    return out


def test_detector_is_defined_exactly_as_in_training() -> None:
    train, infer = parser("train.yaml"), parser("inference.yaml")
    assert_same_detector(infer, train)
    loading = [t for t in infer["preprocessing"]["transforms"]]
    trained = [t for t in train["preprocessing"]["transforms"]]
    assert len(loading) == len(trained)
    for ours, theirs in zip(loading, trained):
        if isinstance(ours, dict) and ours.get("_target_") == "EnsureTyped":
            ours, theirs = {**ours, "track_meta": None}, {**theirs, "track_meta": None}  # writers need metadata
        if isinstance(ours, dict) and ours.get("_target_") == "LoadImaged":
            ours, theirs = {**ours, "keys": None}, {**theirs, "keys": None}  # inference loads labels only if asked
        assert ours == theirs


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_layer_on_inference_and_evaluation(preset: str) -> None:
    """Every id a preset sets exists here (training-only sections are empty placeholders); same weights as training."""
    infer = parser("inference.yaml", f"{preset}.yaml", "evaluate.yaml")
    train = parser("train.yaml", f"{preset}.yaml")
    assert_same_detector(infer, train)
    if preset in ("demo", "demo3d"):  # the paper-scale presets are checked by the raw-config equality above
        ours = infer.get_parsed_content("network_def").state_dict()
        theirs = train.get_parsed_content("network_def").state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    infer.get_parsed_content("preprocessing")
    infer.get_parsed_content("postprocessing")


def test_verify_net_in_out_tiny() -> None:
    """The bundle's shape check on the metadata's [1, 64, 64] input (tiny sizes; the default one is a slow test)."""
    sizes = {k: v for k, v in TINY.items() if k != "image_size"}
    verify_net_in_out(
        net_id="network_def", meta_file=os.path.join(CONFIGS, "metadata.json"), config_file=INFERENCE, device="cpu",
        **sizes,
    )  # fmt: skip


@pytest.mark.slow
@run_slow
def test_verify_net_in_out_default_sizes() -> None:
    cmd = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
           "configs/metadata.json", "--config_file", "configs/inference.yaml"]  # fmt: skip
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0


def test_evaluation_writes_metrics_maps_and_overlays(dataset: str, checkpoint: str, tmp_path) -> None:
    out = str(tmp_path / "eval")
    bundle_run(
        "evaluating", config_file=[INFERENCE, EVALUATE], dataset_dir=dataset,
        datalist=os.path.join(dataset, "datalist.json"), checkpoint=checkpoint, output_dir=out, **TINY,
    )  # fmt: skip
    with open(os.path.join(out, "metrics.json")) as f:
        result = json.load(f)
    for key in ("pixel_auroc", "aupro", "best_dice", "best_dice_threshold", "image_auroc", "n_images"):
        assert key in result
    assert result["n_images"] == 4 and result["checkpoint"] == checkpoint and result["resample"] is True
    data = {"datalist": os.path.join(dataset, "datalist.json"), "dataset_dir": dataset, "label_threshold": 0.0}
    assert result["data"] == data  # which labels were scored and how they were read
    assert set(result["per_category"]) == {"brick", "grass"}
    with open(os.path.join(out, "image_score_raw.csv")) as f:  # MONAI's MetricsSaver, one file per value
        rows = list(csv.DictReader(f))
    assert [r["filename"] for r in rows] == [f"images/test_{i:04d}" for i in range(4)]
    with open(os.path.join(out, "anomalous_raw.csv")) as f:
        assert sum(float(r["class0"]) for r in csv.DictReader(f)) == result["n_anomalous_images"]
    with open(os.path.join(out, "metrics.csv")) as f:
        assert f"aupro,{result['aupro']}" in f.read().splitlines()
    maps = os.path.join(out, "evaluation", "images")
    for name in ("test_0000_score.nii.gz", "test_0000_seg.nii.gz", "test_0003_overlay.png"):
        assert os.path.isfile(os.path.join(maps, name)), name
    score = nib.load(os.path.join(maps, "test_0000_score.nii.gz"))
    seg = np.asarray(nib.load(os.path.join(maps, "test_0000_seg.nii.gz")).dataobj)
    assert score.shape == (48, 48) and seg.dtype == np.uint8
    threshold = np.float32(-math.log(result["density_threshold"]))  # the segmentation is the map's own threshold
    assert np.array_equal(seg > 0, np.asarray(score.dataobj, dtype=np.float32) > threshold)
    assert Image.open(os.path.join(maps, "test_0003_overlay.png")).size[0] > 0


def _evaluate_into(out, dataset: str, checkpoint: str, **overrides) -> dict:
    """The tiny detector's evaluation of the test section into `out`; its metrics."""
    bundle_run(
        "evaluating", config_file=[INFERENCE, EVALUATE], dataset_dir=dataset, datalist=os.path.join(dataset, "datalist.json"),
        checkpoint=checkpoint, output_dir=str(out), **{**TINY, **overrides},
    )  # fmt: skip
    return json.loads((out / "metrics.json").read_text())


def test_another_evaluation_moves_the_earlier_one_aside(dataset: str, checkpoint: str, tmp_path, capsys) -> None:
    """Evaluating another detector (or with other settings) into the same folder replaced the earlier maps and metrics;
    they are moved aside, while a rerun of the same evaluation replaces its own."""
    out = tmp_path / "eval"

    def evaluate(**overrides) -> None:
        _evaluate_into(out, dataset, checkpoint, **{"save_overlays": False, **overrides})

    evaluate()
    evaluate()  # the same evaluation again: nothing to keep
    assert not list(tmp_path.glob("eval/evaluation.replaced-*"))
    evaluate(**{"network_def#resample": False, "save_overlays": True})  # with overlays this time
    evaluate()  # without: the overlays of the run before go aside too, not left beside this run's maps
    assert not list(tmp_path.glob("eval/evaluation/images/*_overlay.png"))
    assert len(list(tmp_path.glob("eval/evaluation.replaced-*/images/*_overlay.png"))) == 4
    evaluate(**{"network_def#resample": False})
    aside = [p for p in tmp_path.glob("eval/evaluation.replaced-*") if not list(p.glob("images/*_overlay.png"))]
    assert len(aside) == 2 and "moved to" in capsys.readouterr().out  # logging.conf: stdout
    kept = json.loads((aside[0] / "metrics.json").read_text())
    assert kept["resample"] is True and (aside[0] / "images" / "test_0000_score.nii.gz").is_file()
    assert (aside[0] / "metrics.csv").is_file() and (aside[0] / "image_score_raw.csv").is_file()
    assert json.loads((out / "metrics.json").read_text())["resample"] is False


def test_an_evaluation_without_maps_keeps_the_earlier_metrics(dataset: str, checkpoint: str, tmp_path) -> None:
    """Without maps there was no record, so another evaluation wrote over the metrics; metrics found without a record
    (an older version's) are of another run as far as anyone can tell."""
    out = tmp_path / "eval"

    def evaluate(**overrides) -> dict:
        return _evaluate_into(out, dataset, checkpoint, **{"save_maps": False, "save_overlays": False, **overrides})

    assert evaluate()["resample"] is True
    assert evaluate(**{"network_def#resample": False})["resample"] is False
    (aside,) = tmp_path.glob("eval/evaluation.replaced-*")
    assert json.loads((aside / "metrics.json").read_text())["resample"] is True
    assert (aside / "image_score_raw.csv").is_file() and (aside / "inference.json").is_file()
    (out / "evaluation" / "inference.json").unlink()
    evaluate(**{"network_def#resample": False})
    assert len(list(tmp_path.glob("eval/evaluation.replaced-*/metrics.json"))) == 2


def test_the_record_of_a_run_without_maps_resumes_nothing_and_unrecorded_maps_stay(tmp_path, caplog) -> None:
    """Without maps nothing is skipped on a rerun, however alike; maps without any record may be a user's own files
    (a custom maps_dir beside the data): they stay, while unrecorded metrics go aside."""
    from scripts.inference import unfinished

    files = [{"image": str(tmp_path / f"{i}.png")} for i in range(2)]
    maps, record = tmp_path / "maps", {"checkpoint": "a"}
    for _ in range(2):  # an evaluation without maps, rerun with --resume_maps True
        assert (
            unfinished(files, str(maps), str(tmp_path), record, [], True, results=[str(tmp_path / "m.json")]) == files
        )
    user = tmp_path / "inf" / "sub" / "case_seg.nii.gz"
    user.parent.mkdir(parents=True)
    user.write_bytes(b"a label of the user's")
    (tmp_path / "metrics.json").write_text("{}")
    with caplog.at_level("WARNING", logger="scripts.inference"):
        unfinished(files, str(tmp_path / "inf"), str(tmp_path), record, ["_seg.nii.gz"], True,
                   results=[str(tmp_path / "metrics.json")])  # fmt: skip
    assert user.is_file() and not (tmp_path / "metrics.json").exists()
    assert "held metrics without a record of what made them" in caplog.text


def test_evaluation_of_a_set_without_anomalies_leaves_its_metrics_undefined_quietly(
    dataset: str, checkpoint: str, tmp_path
) -> None:
    """A test set of normal images only: the set's AUPRO, AUROCs and Dice are null, the per-image Dice NaN, and MONAI's
    MetricsSaver summarises the all-NaN column without numpy's warnings."""
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((48, 48), dtype=np.uint8)).save(empty)
    with open(os.path.join(dataset, "datalist.json")) as f:
        test = [{"image": os.path.join(dataset, e["image"]), "label": str(empty)} for e in json.load(f)["test"]]
    datalist = tmp_path / "normal.json"
    datalist.write_text(json.dumps({"training": [], "validation": [], "test": test}))
    out = str(tmp_path / "eval")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bundle_run(
            "evaluating", config_file=[INFERENCE, EVALUATE], dataset_dir=dataset, datalist=str(datalist),
            checkpoint=checkpoint, output_dir=out, save_maps=False, save_overlays=False, **TINY,
        )  # fmt: skip
    assert not [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    with open(os.path.join(out, "metrics.json")) as f:
        result = json.load(f)
    assert result["n_images"] == 4 and result["n_anomalous_images"] == 0
    assert all(result[k] is None for k in ("aupro", "pixel_auroc", "best_dice", "image_auroc"))
    with open(os.path.join(out, "dice_at_density_threshold_raw.csv")) as f:
        assert len(list(csv.DictReader(f))) == 4


def test_evaluation_without_resampling_is_recorded(dataset: str, checkpoint: str, tmp_path, capsys) -> None:
    """The ablation's record; and a density threshold that segments every voxel is said (a user's undertrained run
    segmented 4,095 of every 4,096 pixels without a word)."""
    out = str(tmp_path / "ablation")
    bundle_run(
        "evaluating", config_file=[INFERENCE, EVALUATE], dataset_dir=dataset, save_maps=False, save_overlays=False,
        datalist=os.path.join(dataset, "datalist.json"), checkpoint=checkpoint, output_dir=out,
        **{**TINY, "network_def#resample": False, "density_threshold": 7.9},  # the KDE's largest: 7.98
    )  # fmt: skip
    with open(os.path.join(out, "metrics.json")) as f:
        result = json.load(f)
    assert result["resample"] is False and result["segmented_share"] > 0.5
    share = f"{result['segmented_share']:.0%}"
    logged = capsys.readouterr()
    assert f"the segmentation at density_threshold 7.9 marks {share} of the voxels of these 4 images" in logged.out
    assert os.listdir(os.path.join(out, "evaluation")) == ["inference.json"]  # no maps; the record of the metrics
    with open(os.path.join(out, "aupro_raw.csv")) as f:  # each image's own AUPRO, for compare's pairing
        own = {row["filename"]: float(row["class0"]) for row in csv.DictReader(f)}
    with open(os.path.join(out, "anomalous_raw.csv")) as f:
        anomalous = {row["filename"]: float(row["class0"]) > 0 for row in csv.DictReader(f)}
    assert own.keys() == anomalous.keys() and any(anomalous.values()) and not all(anomalous.values())
    assert all(0 <= own[n] <= 1 if anomalous[n] else np.isnan(own[n]) for n in own)


def test_restricted_maps_without_flags_rank_as_the_unrestricted_ones(dataset: str, checkpoint: str, tmp_path) -> None:
    """A Transformer that flags nothing (CrackForest, small preset) once left every restricted map one value: AUPRO
    at chance. Far from flags the restricted map keeps the unrestricted map's order, so every ranking metric is the
    same; only the segmentation, empty away from flags, differs."""
    metrics = {}
    for name, restrict in {"restricted": True, "unrestricted": False}.items():
        bundle_run(
            "evaluating", config_file=[INFERENCE, EVALUATE], dataset_dir=dataset, save_maps=False, save_overlays=False,
            datalist=os.path.join(dataset, "datalist.json"), checkpoint=checkpoint, output_dir=str(tmp_path / name),
            **{**TINY, "resample_threshold": 1e-30, "restrict_to_flags": restrict},
        )  # fmt: skip
        with open(tmp_path / name / "metrics.json") as f:
            metrics[name] = json.load(f)
    ranking = ("aupro", "pixel_auroc", "best_dice", "image_auroc")
    # the same up to float32: far from flags the scores are squeezed below the lowest score a KDE can give
    assert all(metrics["restricted"][k] == pytest.approx(metrics["unrestricted"][k], abs=1e-4) for k in ranking)
    assert metrics["restricted"]["pixel_auroc"] != 0.5  # not one value everywhere


def test_folder_inference_needs_no_datalist(dataset: str, checkpoint: str, tmp_path) -> None:
    folder = tmp_path / "in" / "sub"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.open(os.path.join(dataset, "images", f"test_000{i}.png")).save(folder / f"part{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out, unused = str(tmp_path / "out"), str(tmp_path / "no_data_here")
    bundle_run(
        "run", config_file=INFERENCE, folder=str(folder), checkpoint=checkpoint, output_dir=out, dataset_dir=unused,
        **TINY,
    )  # fmt: skip
    written = sorted(os.listdir(os.path.join(out, "inference")))
    assert written == sorted(
        [f"part{i}_{kind}" for i in range(2) for kind in ("overlay.png", "score.nii.gz", "seg.nii.gz")]
        + ["inference.json"]
    )
    assert not os.path.exists(unused)  # the synthetic set was not generated


def test_evaluating_a_folder_stops_before_any_map(dataset: str, checkpoint: str, tmp_path) -> None:
    """A folder gives images without labels, which evaluation's metrics need: said before anything is written."""
    folder, out = tmp_path / "in", tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    Image.open(os.path.join(dataset, "images", "test_0000.png")).save(folder / "sub" / "part0.png")
    with pytest.raises(Exception) as raised:
        bundle_run("evaluating", config_file=[INFERENCE, EVALUATE], folder=str(folder), checkpoint=checkpoint,
                   output_dir=str(out), **TINY)  # fmt: skip
    assert "--folder gives images alone: evaluate a datalist section whose entries have `label`" in _cause(raised)
    assert not out.exists()
    with pytest.raises(Exception) as raised:  # inference: nothing in the folder itself, but in its subfolder
        bundle_run("run", config_file=INFERENCE, folder=str(folder), checkpoint=checkpoint, output_dir=str(out), **TINY)
    assert "no image files" in _cause(raised) and "its subfolders sub have some: pass one as --folder" in _cause(raised)


def _cause(raised: pytest.ExceptionInfo) -> str:
    """The last message of an exception's chain of causes: the bundle's own, under MONAI's wrappers."""
    error = raised.value
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error)


def test_a_wrong_checkpoint_stops_before_any_input_or_earlier_map_is_touched(
    dataset: str, checkpoint: str, tmp_path, capsys
) -> None:
    """The checkpoint is loaded first: a mistyped path (whose record would otherwise leave every setting at its
    default) or a checkpoint of other settings stops the run with that cause, leaves an earlier run's maps and record
    as they were, and evaluation generates no test set."""
    from scripts import cause_chain
    from scripts.checkpoint import CheckpointError

    def cause(err) -> str:
        return str(next(e for e in cause_chain(err.value) if isinstance(e, CheckpointError)))

    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    Image.open(os.path.join(dataset, "images", "test_0000.png")).save(folder / "part.png")
    bundle_run("run", config_file=INFERENCE, folder=str(folder), checkpoint=checkpoint, output_dir=str(out), **TINY)
    before = {f: os.stat(out / "inference" / f).st_mtime_ns for f in os.listdir(out / "inference")}
    assert "part_overlay.png" in before and "inference.json" in before
    assert (
        f"inference done: 1 input(s); their _score.nii.gz, _seg.nii.gz, _overlay.png files are in {out / 'inference'}"
        in (capsys.readouterr().out)
    )  # the last line says what was done and where (it used to be ignite's "Engine run finished")
    typo = checkpoint.replace("model.pt", "modle.pt")
    for path, other, message in (
        (typo, {}, "modle.pt: checkpoint not found. Pass --checkpoint"),
        (checkpoint, {"image_size": [48, 48]}, "image_size: trained with [32, 32], this config has [48, 48]"),
        # a 2D detector told it is 3D: said so, rather than asking for three image sizes (a new user's 3D pass)
        (checkpoint, {"spatial_dims": 3}, "spatial_dims: trained with 2, this config has 3. configs/inference.yaml"),
        # a preset of the other dimension (demo.yaml on a 3D detector asked for a 3D image_size, then failed again)
        (
            checkpoint,
            {"image_size": [32, 32, 16]},
            "image_size: trained with [32, 32], this config has [32, 32, 16]. "
            "configs/inference.yaml takes these from the checkpoint",
        ),
    ):
        with pytest.raises(Exception) as err:
            bundle_run("run", config_file=INFERENCE, folder=str(folder), checkpoint=path, output_dir=str(out),
                       **{**TINY, **other, "seed": 1})  # fmt: skip
        assert message in cause(err)
        assert {f: os.stat(out / "inference" / f).st_mtime_ns for f in os.listdir(out / "inference")} == before
    unused = tmp_path / "no_data_here"
    with pytest.raises(Exception) as err:
        bundle_run("evaluating", config_file=[INFERENCE, EVALUATE], checkpoint=typo, dataset_dir=str(unused),
                   output_dir=str(tmp_path / "eval"), **TINY)  # fmt: skip
    assert "checkpoint not found" in cause(err)
    assert not unused.exists() and not (tmp_path / "eval").exists()


def test_the_evaluator_run_alone_maps_with_the_checkpoint(dataset: str, checkpoint: str, tmp_path) -> None:
    """`run` loads the checkpoint as its first step; a tool that runs the `evaluator` itself still gets its weights."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.open(os.path.join(dataset, "images", "test_0000.png")).save(folder / "part.png")
    p = parser("inference.yaml", **TINY, bundle_root=ROOT, folder=str(folder), checkpoint=checkpoint,
               output_dir=str(tmp_path / "out"))  # fmt: skip
    p.get_parsed_content("evaluator").run()
    weights = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    for name, value in p.get_parsed_content("network").state_dict().items():
        assert torch.equal(value.cpu(), weights[name]), name
    assert os.path.isfile(tmp_path / "out" / "inference" / "part_overlay.png")


def test_inputs_that_load_badly_are_all_named_before_any_map(dataset: str, checkpoint: str, tmp_path, capsys) -> None:
    """Problems only loading shows (channels, intensity range) stop folder inference before any map, every bad input
    named at once; images in subfolders, which a folder run does not process, are reported."""
    folder = tmp_path / "in"
    (folder / "deeper").mkdir(parents=True)
    grey = np.asarray(Image.open(os.path.join(dataset, "images", "test_0000.png")).convert("L"))
    Image.fromarray(grey).save(folder / "good.png")
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(folder / "colour.png")  # the detector has one channel
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "sixteen.png")  # 16-bit into an 8-bit detector
    Image.fromarray(grey).save(folder / "deeper" / "skipped.png")
    out = tmp_path / "out"
    with pytest.raises(Exception) as err:
        bundle_run("run", config_file=INFERENCE, folder=str(folder), checkpoint=checkpoint, output_dir=str(out),
                   **TINY)  # fmt: skip
    from scripts import cause_chain
    from scripts.data import DataError

    lines = str(next(e for e in cause_chain(err.value) if isinstance(e, DataError))).splitlines()
    assert lines[0] == "2 of 3 entries cannot be used:"
    assert any("colour.png" in line and "3 channels" in line for line in lines)
    assert any("sixteen.png" in line and "outside [0, 255]" in line for line in lines)
    assert not (out / "inference").exists()  # nothing written: no map, not even the record of this inference
    assert "the images in its subfolders (deeper) are not processed" in capsys.readouterr().out  # logging.conf: stdout
    # after another inference into the folder, a run with other settings whose inputs fail leaves its maps as they are
    (folder / "colour.png").unlink()
    (folder / "sixteen.png").unlink()
    bundle_run("run", config_file=INFERENCE, folder=str(folder), checkpoint=checkpoint, output_dir=str(out), **TINY)
    before = {f: os.path.getmtime(out / "inference" / f) for f in os.listdir(out / "inference")}
    assert "good_overlay.png" in before and "inference.json" in before
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "sixteen.png")
    with pytest.raises(Exception) as err:
        bundle_run("run", config_file=INFERENCE, folder=str(folder), checkpoint=checkpoint, output_dir=str(out),
                   **{**TINY, "seed": 1})  # fmt: skip
    assert "sixteen.png" in str(next(e for e in cause_chain(err.value) if isinstance(e, DataError)))
    assert {f: os.path.getmtime(out / "inference" / f) for f in os.listdir(out / "inference")} == before


def test_killed_inference_resumes_without_remapping(dataset: str, checkpoint: str, tmp_path, monkeypatch) -> None:
    """A rerun of the same inference keeps the maps already written and maps the rest: the input whose last output
    (its overlay) is missing, and the one whose overlay a kill cut short. Other settings map every input again, even
    when their first attempt was killed before it wrote anything."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.open(os.path.join(dataset, "images", f"test_000{i}.png")).save(folder / f"part{i}.png")
    out = str(tmp_path / "out")
    maps = os.path.join(out, "inference")

    def infer(**overrides) -> dict[str, int]:
        bundle_run("run", config_file=INFERENCE, folder=str(folder), checkpoint=checkpoint, output_dir=out,
                   **TINY, **overrides)  # fmt: skip
        return {n: os.stat(os.path.join(maps, n)).st_mtime_ns for n in os.listdir(maps) if n.startswith("part")}

    first = infer()
    os.remove(os.path.join(maps, "part1_overlay.png"))  # killed before its overlay was written
    overlay = os.path.join(maps, "part2_overlay.png")
    with open(overlay, "r+b") as f:  # killed while writing it
        f.truncate(os.path.getsize(overlay) // 2)
    second = infer()
    assert len(second) == 9
    assert all(second[n] == first[n] for n in first if n.startswith("part0"))
    assert all(second[n] != first[n] for n in first if not n.startswith("part0"))
    assert Image.open(overlay).load() is not None
    other = {"network_def#resample": False}  # another inference, killed before its first map, then rerun
    with monkeypatch.context() as m:
        m.setattr(AnomalyInferer, "__call__", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
        with pytest.raises(BaseException):
            infer(**other)
    third = infer(**other)  # the first run's complete maps are not taken for this one's: they were moved aside
    assert all(third[n] != second[n] for n in second)
    (aside,) = [p for p in os.listdir(out) if p.startswith("inference.replaced-")]
    assert sorted(os.listdir(os.path.join(out, aside))) == sorted([*second, "inference.json"])
    fourth = infer(**other, resume_maps=False)
    assert all(fourth[n] != third[n] for n in third)


def test_summarise_matches_metrics_and_marks_undefined_as_none(caplog) -> None:
    rng = np.random.default_rng(0)
    scores = [rng.random((8, 8)).astype(np.float32) for _ in range(3)]
    labels = [np.zeros((8, 8), bool), rng.random((8, 8)) > 0.7, rng.random((8, 8)) > 0.8]
    out = summarise(scores, labels, density_threshold=math.exp(-0.5))
    assert out["aupro"] == pytest.approx(metrics.aupro(scores, labels))
    assert out["image_auroc"] == pytest.approx(metrics.image_auroc(scores, labels))
    dice, thr = metrics.best_dice(scores, labels)
    assert (out["best_dice"], out["best_dice_threshold"]) == pytest.approx((dice, thr))
    seg, lab = np.stack(scores) > 0.5, np.stack(labels)
    assert out["dice_at_density_threshold"] == pytest.approx(2 * (seg & lab).sum() / (seg.sum() + lab.sum()))
    with caplog.at_level("WARNING", logger="scripts.evaluation"):
        normal_only = summarise(scores[:1], labels[:1], 0.005)
        assert caplog.text.count("reported as null") == 1  # image AUROC
        assert summarise(scores[:1], labels[:1], 0.005, warn=False) == normal_only  # a category's subset: quiet
    assert caplog.text.count("reported as null") == 1 and caplog.text.count("not reported") == 1
    assert normal_only["aupro"] is None and normal_only["image_auroc"] is None


def test_output_names_are_those_of_monai_writers(tmp_path) -> None:
    """Overlays, collision checks and metric tables name an input as SaveImaged names its maps."""
    root = tmp_path / "d"
    for path, expected in ((root / "bottle" / "test" / "good" / "000.png", "bottle/test/good/000"),
                           (root / "scan.nii.gz", "scan")):  # fmt: skip
        assert output_name(str(path), str(root)) == expected
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".png":
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
        else:
            nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), path)
        item = LoadImaged("image", ensure_channel_first=True)({"image": str(path)})
        SaveImaged("image", output_dir=str(tmp_path / "out"), output_postfix="score", output_ext=".nii.gz",
                   data_root_dir=str(root), separate_folder=False, print_log=False)(item)  # fmt: skip
        assert (tmp_path / "out" / f"{expected}_score.nii.gz").is_file()


@pytest.mark.parametrize("spatial", [(32, 24), (16, 6, 24)])
def test_the_overlay_outlines_the_true_mask_where_it_is(tmp_path, monkeypatch, spatial) -> None:
    """The green outline sits on the mask's pixels in the panel's own coordinates (imshow's pixel centres)."""
    from scripts import overlays, plots

    figures = []
    monkeypatch.setattr(overlays, "figure", lambda **kw: figures.append(plots.figure(**kw)) or figures[-1])
    label = torch.zeros(1, *spatial)
    label[0, 3:7, ..., 15:20] = 1  # panel columns 3-6 (first axis), rows 15-19 (last axis; a 3D view projects Y)
    overlays.save_overlay(str(tmp_path / "o.png"), torch.rand(1, *spatial), torch.rand(1, *spatial), 0.5, label)
    panel = figures[0].axes[2]
    assert panel.get_title() == "segmentation (green: truth)" and figures[0]._suptitle.get_text() == "o.png"
    (outline,) = [c for c in panel.collections if hasattr(c, "get_paths") and len(c.get_paths())]
    xy = np.concatenate([p.vertices for p in outline.get_paths()])
    assert (xy[:, 0].min(), xy[:, 0].max()) == pytest.approx((2.5, 6.5))  # half a pixel outside columns 3-6
    assert (xy[:, 1].min(), xy[:, 1].max()) == pytest.approx((14.5, 19.5))  # and rows 15-19
    figures.clear()  # titled with the input's path below the input root: every autoPET input is SUV.nii.gz
    overlays.save_overlay(str(tmp_path / "n.png"), torch.rand(1, *spatial), torch.rand(1, *spatial), 0.5,
                          title="PETCT_1/study/SUV")  # fmt: skip
    assert figures[0].axes[2].get_title() == "segmentation" and figures[0]._suptitle.get_text() == "PETCT_1/study/SUV"
    figures.clear()  # a baseline's map is no density: no segmentation, the truth alone beside its score
    overlays.save_overlay(str(tmp_path / "b.png"), torch.rand(1, *spatial), torch.rand(1, *spatial), None, label)
    assert [ax.get_title() for ax in figures[0].axes[:3]] == ["image", "anomaly score", "truth (green)"]
    figures.clear()
    overlays.save_overlay(str(tmp_path / "u.png"), torch.rand(1, *spatial), torch.rand(1, *spatial), None)
    assert figures[0].axes[2].get_title() == "image"
    assert len(figures[0].axes[2].get_images()) == 1  # the image, no segmentation layer
    assert parser("inference.yaml", "baseline_nsa.yaml").get_parsed_content("segmentation_threshold") is None


def test_colour_inputs_get_maps_of_their_size(dataset: str, tmp_path) -> None:
    """An RGB model (MVTec's colour categories) maps RGB PNG and JPEG inputs: the maps have no channel, whatever the
    channel-last layout of the loaded image says."""
    rgb = {**TINY, "in_channels": 3}
    path = str(tmp_path / "rgb.pt")
    p = parser("inference.yaml", **rgb)
    detector = p.get_parsed_content("network_def")
    save_detector(detector, detector_record(detector, p.get_parsed_content("detector_settings")), path)
    folder = tmp_path / "in"
    folder.mkdir()
    image = Image.open(os.path.join(dataset, "images", "test_0000.png")).convert("RGB").crop((0, 0, 48, 40))
    image.save(folder / "a.png")
    image.save(folder / "b.jpg")
    out = str(tmp_path / "out")
    bundle_run("run", config_file=INFERENCE, folder=str(folder), checkpoint=path, output_dir=out, **TINY)
    for name in ("a", "b"):
        score = nib.load(os.path.join(out, "inference", f"{name}_score.nii.gz"))
        seg = nib.load(os.path.join(out, "inference", f"{name}_seg.nii.gz"))
        assert score.shape == seg.shape == (48, 40), name  # the map has the input's width and height
        assert os.path.isfile(os.path.join(out, "inference", f"{name}_overlay.png"))


def test_a_maps_folder_that_cannot_be_made_is_named() -> None:
    from scripts.inference import unfinished

    with pytest.raises(OSError, match=r"/proc/iltm_maps: the maps cannot be written there .*writable --output_dir"):
        unfinished([{"image": "a.png"}], "/proc/iltm_maps", None, {}, ["_score.nii.gz"])


def test_a_folder_pattern_maps_the_images_and_not_the_masks_beside_them(tmp_path) -> None:
    """Magnetic Tile keeps each mask (x.png) beside its image (x.jpg): their maps would share a name. The refusal
    names --folder_pattern, which selects the images."""
    from scripts.data import DataError
    from scripts.inference import input_files

    for i in range(2):
        Image.fromarray(np.full((8, 8), 100, np.uint8)).save(tmp_path / f"tile{i}.jpg")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"tile{i}.png")
    with pytest.raises(
        DataError,
        match=r"(?s)tile0.png: its maps would overwrite those of .*or narrow the inputs with --folder_pattern",
    ):
        input_files(str(tmp_path), None, str(tmp_path))
    chosen = input_files(str(tmp_path), None, str(tmp_path), pattern="*.jpg")
    assert [os.path.basename(e["image"]) for e in chosen] == ["tile0.jpg", "tile1.jpg"]
    with pytest.raises(DataError, match=r"no image files matching folder_pattern '\*.tif'"):
        input_files(str(tmp_path), None, str(tmp_path), pattern="*.tif")
    one = str(tmp_path / "tile1.jpg")  # one image given as --folder: the flags that map it (a user's pass)
    with pytest.raises(
        DataError, match=f"tile1.jpg: a file, not a folder; .*--folder {tmp_path} --folder_pattern tile1.jpg"
    ):
        input_files(one, None, str(tmp_path))
    assert input_files(str(tmp_path), None, str(tmp_path), pattern="tile1.jpg") == [{"image": one}]
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.yaml"))
    parser.update({"bundle_root": ROOT, "folder": str(tmp_path), "folder_pattern": "*.jpg"})
    assert [os.path.basename(e["image"]) for e in parser.get_parsed_content("inference_files")] == [
        "tile0.jpg",
        "tile1.jpg",
    ]
