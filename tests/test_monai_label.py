"""The bundle served the way MONAI Label 0.8's `monaibundle` app serves it: its infer task reproduced step by step from
MONAI Label's source (`tasks/infer/bundle.py`, `tasks/infer/basic_infer.py`, `transform/pre.py`, `transform/post.py`,
`transform/writer.py`), because the package needs torchvision and cannot be one of this project's requirements.

What the reproduction keeps from MONAI Label, since each of these broke the bundle once: the config is
`configs/inference.json` or `.yaml` read alone with `bundle_root` set; the network is `network_def`, loaded with
`checkpoint.get("model", checkpoint)`; `LoadImaged` runs with `image_only=False` inside a wrapper that looks up every
key it names; `SaveImaged` is dropped from the postprocessing and a resize-to-the-input step appended; the writer
transposes `pred`, casts it and writes it with ITK in the input's file format. The models here are tiny and random.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import MetaTensor
from monai.transforms import LoadImaged, Resize, SaveImaged
from PIL import Image
from tiny import TINY_DETECTOR

from scripts.checkpoint import describe, detector_record, save_detector
from scripts.synthetic import make_2d, make_3d

pytestmark = pytest.mark.filterwarnings("ignore:builtin type")  # ITK's SWIG types, on import
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_2D = TINY_DETECTOR
TINY_3D = {
    **TINY_2D,
    "spatial_dims": 3,
    "image_size": [8, 8, 16],
    "intensity_max": 15.0,
    "kde_units#intensity_scale": 1.0,
    "kde_units#epsilon": 0.05,
    "vqvae_def#channels": [8],
    "vqvae_def#num_res_channels": [8],
    "vqvae_def#downsample_parameters": [[2, 4, 1, 1]],
    "vqvae_def#upsample_parameters": [[2, 4, 1, 1, 0]],
}


class KeyLookupLoader:
    """MONAI Label's `LoadImageTensord`: reads `d[key]` for every key of the wrapped loader, then loads."""

    def __init__(self, load: LoadImaged) -> None:
        self.load = load

    def __call__(self, data: dict) -> dict:
        if all(isinstance(data[key], str) for key in self.load.keys):  # KeyError for a key the request lacks
            return self.load(data)
        return data


def restored(data: dict, key: str = "pred", ref: str = "image") -> dict:
    """MONAI Label's `Restored`: back to the input's spatial shape (nearest), a leading singleton of 4D dropped."""
    d = dict(data)
    meta = d[ref].meta if isinstance(d[ref], MetaTensor) else d.get(f"{ref}_meta_dict", {})
    result = d[key]
    current = tuple(result.shape[1:])
    target = tuple(meta.get("spatial_shape", current))[-len(current) :]
    if current != tuple(int(s) for s in target):
        result = Resize(spatial_size=target, mode="nearest")(result)
    d[key] = result if result.ndim <= 3 else result[0] if result.shape[0] == 1 else result
    return d


def write(data: dict, request: dict) -> str:
    """MONAI Label's `Writer` for a single-channel label: transpose, cast, ITK write in the input's format."""
    path = data["image_path"]
    ext = request.get("result_extension") or (".nii.gz" if path.endswith(".nii.gz") else os.path.splitext(path)[1])
    array = data["pred"].array if isinstance(data["pred"], MetaTensor) else np.asarray(data["pred"])
    array = np.asarray(array).transpose().copy()
    if request.get("result_dtype"):
        array = array.astype(request["result_dtype"])
    out = tempfile.NamedTemporaryFile(suffix=ext, delete=False).name
    itk.imwrite(itk.image_from_array(array), out, False)
    return out


def serve(bundle: str, image: str, **request) -> tuple[str, dict, dict]:
    """One `POST /infer/<model>` against the bundle folder: (result file, result JSON, labels from metadata)."""
    config = next(os.path.join(bundle, "configs", c) for c in ("inference.json", "inference.yaml")
                  if os.path.exists(os.path.join(bundle, "configs", c)))  # fmt: skip
    parser = ConfigParser()
    parser.read_config(config)
    parser.config.update({"bundle_root": bundle})
    network = parser.get_parsed_content("network_def", instantiate=True)
    with open(os.path.join(bundle, "configs", "metadata.json")) as f:
        metadata = json.load(f)
    _, pred_format = next(iter(metadata["network_data_format"]["outputs"].items()))
    labels = {v.lower(): int(k) for k, v in pred_format.get("channel_def", {}).items() if v.lower() != "background"}

    pre = list(parser.get_parsed_content("preprocessing", instantiate=True).transforms)
    for t in pre:
        if isinstance(t, LoadImaged):
            t._loader.image_only = False
    pre = [KeyLookupLoader(t) if isinstance(t, LoadImaged) else t for t in pre]
    data = {"image": image, "image_path": image, "device": "cpu", **request}
    for t in pre:
        data = t(data)

    checkpoint = torch.load(os.path.join(bundle, "models", "model.pt"), map_location="cpu")
    network.load_state_dict(checkpoint.get("model", checkpoint), strict=True)
    network.eval()
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]

    post = list(parser.get_parsed_content("postprocessing", instantiate=True).transforms)
    for t in post:
        if not isinstance(t, SaveImaged):
            data = t(data)
    data = restored(data)
    return write(data, request), data.get("result", {}), labels


def serve_volume(bundle: str, tmp_path, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A random SUV-like volume at 4 mm served through the bundle; the label map as read back from its file."""
    volume = str(tmp_path / "pet.nii.gz")
    values = np.random.default_rng(seed).uniform(0, 15, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(values, np.diag([4, 4, 4, 1])), volume)
    result, _, _ = serve(bundle, volume)
    return np.asarray(nib.load(result).dataobj)


def bundle_trained_with(tmp_path, overrides: dict) -> str:
    """A bundle folder (configs + models/model.pt) whose model was trained with a preset: `overrides` here."""
    bundle = str(tmp_path / "model" / "iltm")
    shutil.copytree(os.path.join(ROOT, "configs"), os.path.join(bundle, "configs"))
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.yaml"))
    parser.update({"bundle_root": bundle, **overrides})
    torch.manual_seed(0)
    detector = parser.get_parsed_content("network_def")
    record = detector_record(detector, parser.get_parsed_content("detector_settings"))
    save_detector(detector, record, os.path.join(bundle, "models", "model.pt"))
    return bundle


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> str:
    """A grey 40 x 48 PNG: not square, so a transposed result would show."""
    out = str(tmp_path_factory.mktemp("data"))
    make_2d(out, n_train=1, n_val=1, n_test=1, image_size=48, preview=False)
    path = os.path.join(out, "part.png")
    Image.open(os.path.join(out, "images", "test_0000.png")).crop((0, 0, 40, 48)).save(path)
    return path


def test_png_request_returns_a_uint8_label_map_of_the_input_size(tmp_path, png: str) -> None:
    bundle = bundle_trained_with(tmp_path, TINY_2D)  # not the default sizes: inference.yaml must follow the model
    result, answer, labels = serve(bundle, png)
    assert labels == {"anomaly": 1}
    written = np.asarray(Image.open(result))
    assert written.shape == np.asarray(Image.open(png)).shape[:2] and written.dtype == np.uint8
    assert set(np.unique(written)) <= {0, 1}
    assert {"image_score", "anomalous_fraction"} <= set(answer)
    assert answer["anomalous_fraction"] == pytest.approx(float(written.mean()), abs=1e-6)


def test_score_map_on_request(tmp_path, png: str) -> None:
    bundle = bundle_trained_with(tmp_path, TINY_2D)
    result, answer, _ = serve(bundle, png, anomaly_output="score", result_extension=".nii.gz")
    score = np.asarray(nib.load(result).dataobj)
    assert score.shape == (40, 48) and score.dtype == np.float32  # NIfTI keeps MONAI's (x, y) order
    assert float(score.max()) == pytest.approx(answer["image_score"], rel=1e-5)


def test_3d_nifti_request(tmp_path) -> None:
    bundle = bundle_trained_with(tmp_path, TINY_3D)
    seg = serve_volume(bundle, tmp_path, (10, 12, 20), seed=0)
    assert seg.shape == (10, 12, 20) and set(np.unique(seg)) <= {0, 1}


def test_pet_preprocessing_of_the_training_preset_is_served_too(tmp_path) -> None:
    """autopet.yaml's chain (RAS, resampling, foreground crop, pad/crop) is recorded as settings, so the bundle
    trained with it serves through inference.yaml alone and the map comes back on the input's grid."""
    pet = {**TINY_3D, "spacing": [8.0, 8.0, 8.0], "foreground_threshold": 0.01, "resize_mode": "pad_crop"}
    bundle = bundle_trained_with(tmp_path, pet)
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "configs", "inference.yaml"))
    parser.config.update({"bundle_root": bundle})
    assert describe(parser.get_parsed_content("spatial"))[1:-1] == ["Orientationd", "Spacingd", "CropForegroundd",
                                                                    "ResizeWithPadOrCropd"]  # fmt: skip
    seg = serve_volume(bundle, tmp_path, (30, 28, 60), seed=1)
    assert seg.shape == (30, 28, 60) and set(np.unique(seg)) <= {0, 1}

    # The air the foreground crop removed comes back as the most normal score, not as Invertd's fill value 0.
    body = np.zeros((30, 28, 60), np.float32)
    body[8:22, 8:20, 10:50] = np.random.default_rng(2).uniform(1, 15, (14, 12, 40))
    nib.save(nib.Nifti1Image(body, np.diag([4, 4, 4, 1])), str(tmp_path / "body.nii.gz"))
    result, answer, _ = serve(bundle, str(tmp_path / "body.nii.gz"), anomaly_output="score", result_extension=".nii.gz")
    score = np.asarray(nib.load(result).dataobj)
    # -log of the largest density (ε = 0.05, autoPET's units): AnomalyDetector.lowest_score of unrestricted maps
    floor = math.log(0.05 * math.sqrt(2 * math.pi))
    assert score[:4].max() == pytest.approx(floor, abs=1e-4) and score.min() == pytest.approx(floor, abs=1e-4)
    assert answer["image_score"] == pytest.approx(float(score.max()), rel=1e-5)


def test_metadata_and_configs_agree_with_what_is_served() -> None:
    with open(os.path.join(ROOT, "configs", "metadata.json")) as f:
        pred = json.load(f)["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "anomaly"}


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory) -> dict[int, str]:
    out = {2: str(tmp_path_factory.mktemp("set2d")), 3: str(tmp_path_factory.mktemp("set3d"))}
    make_2d(out[2], n_train=2, n_val=1, n_test=1, image_size=32, preview=False)
    make_3d(out[3], n_train=2, n_val=1, n_test=1, grid=(8, 8, 16), preview=False)
    return out


@pytest.mark.parametrize(
    "workflow, preset, dims",
    [("train", None, 2), ("train", "demo", 2), ("train", "mvtec", 2), ("train", "small", 2), ("train", "demo3d", 3),
     ("train", "autopet", 3), ("infer", None, 2), ("infer", "demo3d", 3)],
)  # fmt: skip
def test_standard_workflow_properties(tiny_sets, workflow: str, preset: str | None, dims: int) -> None:
    """What MONAI Label's train task and the Model Zoo's checks look up: `check_properties()` finds every property."""
    files = [os.path.join(ROOT, "configs", "train.yaml" if workflow == "train" else "inference.yaml")]
    files += [os.path.join(ROOT, "configs", f"{preset}.yaml")] if preset else []
    data = tiny_sets[dims]
    flow = ConfigWorkflow(
        config_file=files, meta_file=os.path.join(ROOT, "configs", "metadata.json"), workflow_type=workflow,
        bundle_root=ROOT, dataset_dir=data, datalist=os.path.join(data, "datalist.json"),
    )  # fmt: skip
    flow.initialize()
    assert flow.check_properties() == []


def test_monai_label_training_overrides_land_where_the_pipeline_reads_them(tiny_sets) -> None:
    """MONAI Label's train task sets `train#dataset#data`, `validate#dataset#data` and `train#trainer#max_epochs`."""
    data = tiny_sets[2]
    with open(os.path.join(data, "datalist.json")) as f:
        entries = [{k: os.path.join(data, v) for k, v in e.items() if k in ("image", "label")}
                   for e in json.load(f)["test"]]  # fmt: skip
    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, "configs", f) for f in ("train.yaml", "demo.yaml")])
    parser.update({"bundle_root": ROOT, "dataset_dir": data, "datalist": os.path.join(data, "datalist.json")})
    parser.update({"train#dataset#data": entries, "validate#dataset#data": entries[:1], "train#trainer#max_epochs": 3})
    assert parser.get_parsed_content("train#trainer").state.max_epochs == 3
    # what the run records (run.json) is what trains: a rerun with another max_epochs is another run's settings
    assert parser.get_parsed_content("run_settings")["vqvae"]["epochs"] == 3
    iltm = parser.get_parsed_content("iltm#workflow")
    assert iltm.train_files == entries and iltm.val_files == entries[:1]


def test_monai_label_training_panel_offers_overwrite() -> None:
    """BundleTrainTask shows `displayable_configs` and sets them as `displayable_configs#<name>` overrides."""
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.yaml"))
    assert parser.get_parsed_content("displayable_configs") == {"overwrite": False}
    parser.update({"displayable_configs": {"overwrite": True}})
    assert parser.get_parsed_content("overwrite") is True
