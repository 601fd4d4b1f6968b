"""No silent wrong answers: each bad input of a realistic user stops before any work with one message that names the
file or setting and the cause. Through the bundle's own commands where the check lives in the configs."""

from __future__ import annotations

import json
import logging
import os
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run
from PIL import Image
from tiny import TINY_DETECTOR

from scripts import steps
from scripts.checkpoint import CheckpointError, atomic_save
from scripts.data import DataError, load_datalist
from scripts.inference import check_inputs, input_files
from scripts.settings import SettingError
from scripts.steps import RunState
from scripts.synthetic import ensure_dataset, make_2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN, INFERENCE = (os.path.join(ROOT, "configs", f) for f in ("train.yaml", "inference.yaml"))


def cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("data"))
    make_2d(out, n_train=4, n_val=2, n_test=2, image_size=32, preview=False)
    return out


@pytest.mark.parametrize(
    "override, says",
    [
        ({"num_samples": "abc"}, "num_samples must be a whole number, got 'abc'"),
        ({"num_samples": 0}, "num_samples must be >= 1, got 0"),
        ({"kde_units#density_threshold": -1}, "kde_units#density_threshold must be > 0.0, got -1"),
        ({"image_size": [0, 0]}, "image_size must be positive sizes"),
        ({"image_size": [32, 32, 32]}, "image_size must have spatial_dims = 2 sizes"),
        ({"restrict_to_flags": "false"}, "restrict_to_flags must be True or False"),
        ({"flag_neighbourhood": 2}, "flag_neighbourhood must be an odd whole number >= 1"),
        ({"iltm#downsample_rule": "all"}, "iltm#downsample_rule must be one of 'any', 'fraction'"),
        ({"intensity_max": -5.0}, "intensity_max (-5.0) must be above intensity_min (0.0)"),
        ({"vqvae#epochs": 2.5}, "vqvae#epochs must be a whole number"),
        ({"max_clipped_fraction": 2}, "max_clipped_fraction must be <= 1.0, got 2"),
        ({"device": "cuda:99"}, "device must be a device this machine has (torch "),  # not PyTorch's bare assertion
        ({"device": "gpu"}, "device must be a torch device, e.g. 'cpu' or 'cuda:0', got 'gpu'"),
        (
            {"image_size": [36, 30]},
            "image_size must be a multiple of 4 in every dimension (the network's strides "
            'divide each side by 4), got [36, 30]; e.g. --image_size "[36, 32]"',
        ),
    ],
)
def test_settings_outside_their_domain_stop_training_before_any_work(tmp_path, data, override, says) -> None:
    out = tmp_path / "run"
    with pytest.raises(Exception) as err:
        run("training", config_file=TRAIN, bundle_root=ROOT, output_dir=str(out), dataset_dir=data,
            datalist=os.path.join(data, "datalist.json"), **override)  # fmt: skip
    assert isinstance(cause(err.value), SettingError) and says in str(cause(err.value))
    assert not out.exists()


def test_more_minimum_than_maximum_iterations_is_named(caplog) -> None:
    from scripts.settings import check_settings

    with caplog.at_level("WARNING", logger="scripts.settings"):
        check_settings({"iltm": {"max_iterations": 1, "min_iterations": 3}})
    assert "iltm#min_iterations (3) is above iltm#max_iterations (1): ILTM trains at most 1" in caplog.text


def test_inference_settings_are_checked_too(tmp_path, data) -> None:
    with pytest.raises(Exception) as err:
        run("run", config_file=INFERENCE, bundle_root=ROOT, output_dir=str(tmp_path / "x"), dataset_dir=data,
            datalist=os.path.join(data, "datalist.json"), checkpoint=str(tmp_path / "none.pt"), num_decodes=0)  # fmt: skip
    assert "num_decodes must be >= 1, got 0" in str(cause(err.value))


def _bad_folder(tmp_path, data) -> str:
    folder = tmp_path / "in"
    folder.mkdir()
    good = os.path.join(data, "images", "test_0000.png")
    Image.open(good).save(folder / "a.png")
    Image.open(good).save(folder / "a.bmp")  # same stem: its maps would overwrite a.png's
    raw = open(good, "rb").read()
    (folder / "truncated.png").write_bytes(raw[: len(raw) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    return str(folder)


def test_a_folder_with_bad_files_names_every_one_before_any_map(tmp_path, data, checkpoint) -> None:
    folder, out = _bad_folder(tmp_path, data), tmp_path / "out"
    with pytest.raises(Exception) as err:
        run("run", config_file=INFERENCE, bundle_root=ROOT, folder=folder, output_dir=str(out), checkpoint=checkpoint,
            **TINY_DETECTOR)  # fmt: skip
    message = str(cause(err.value))
    assert "4 of 5 inputs cannot be processed; nothing was written" in message
    for name, why in (("truncated.png", "Truncated"), ("empty.png", "empty file"), ("text.png", "cannot be read"),
                      ("a.png", "would overwrite those of")):  # fmt: skip
        assert any(name in line and why in line for line in message.splitlines()), name
    assert not out.exists()


def test_inputs_on_another_intensity_scale(tmp_path, data, caplog, monkeypatch) -> None:
    from scripts.data import CheckImaged

    monkeypatch.setattr(CheckImaged, "warned", 0)
    monkeypatch.setattr(logging.getLogger("scripts.data"), "disabled", False)  # logging.conf of an earlier run
    image = np.asarray(Image.open(os.path.join(data, "images", "test_0000.png")).convert("L"), dtype=np.uint16)
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(image * 257).save(sixteen)  # the same picture, 16-bit
    unit = tmp_path / "unit.nii.gz"
    nib.save(nib.Nifti1Image(image.T.astype(np.float32) / 255.0, np.eye(4)), unit)  # the same, floats in [0, 1]
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(INFERENCE)
    loading = parser.get_parsed_content("preprocessing")
    with pytest.raises(Exception) as err:
        loading({"image": str(sixteen)})
    assert "of its intensities lie outside [0, 255]" in str(cause(err.value)) and "sixteen.png" in str(cause(err.value))
    assert "raise max_clipped_fraction (0.05) where clipping is intended" in str(cause(err.value))
    from scripts.data import DataError, check_data

    Image.fromarray(image * 200).save(tmp_path / "another.png")
    with pytest.raises(DataError) as err:  # several such files: each named, the advice given once, after them
        check_data([{"image": str(sixteen)}, {"image": str(tmp_path / "another.png")}], loading)
    listed, *rest = str(err.value).split("\nAnother bit depth or scale?")
    assert listed.startswith("2 of 2 entries cannot be used:") and "another.png: " in listed and len(rest) == 1
    rgb = [tmp_path / f"rgb{i}.png" for i in range(2)]
    for path in rgb:
        Image.fromarray(np.stack([image.astype(np.uint8)] * 3, axis=-1)).save(path)
    with pytest.raises(DataError) as err:  # colour images for a grey model: the same
        check_data([{"image": str(path)} for path in rgb], loading)
    assert str(err.value).count("has 3 channels") == 2 and str(err.value).count("--in_channels 3") == 1
    windowed = ConfigParser()  # clipping on purpose (a CT window): the user allows it
    windowed.read_config(INFERENCE)
    windowed["max_clipped_fraction"] = 1.0
    assert windowed.get_parsed_content("preprocessing")({"image": str(sixteen)})["image"].max() == 1.0
    with caplog.at_level(logging.WARNING, logger="scripts.data"):
        loading({"image": str(unit)})
    assert any("unit.nii.gz: spans " in r.getMessage() and "of [0, 255]" in r.getMessage() for r in caplog.records)


def test_corrupt_run_state_and_resume_checkpoints(tmp_path) -> None:
    (tmp_path / "state.json").write_text('{"vqvae": {"weights"')
    with pytest.raises(RuntimeError, match=r"state.json: unreadable \(JSONDecodeError"):
        RunState(str(tmp_path)).done("vqvae")

    class Trainer:  # only what train_stage reads before training
        network, optimizer, scaler = torch.nn.Linear(1, 1), None, None

    folder = tmp_path / "vqvae"
    folder.mkdir()
    (folder / "checkpoint_3.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"(?s)checkpoint_3.pt: the checkpoint file is empty.*Delete it to train"):
        steps.train_stage("vqvae", Trainer(), str(folder / "vqvae.pt"), str(tmp_path / "other"))


def test_a_failed_write_names_the_file(tmp_path, monkeypatch) -> None:
    def full_disk(obj, path):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", full_disk)
    target = tmp_path / "model.pt"
    with pytest.raises(OSError, match=f"{target}: could not be written .*disk full"):
        atomic_save({}, str(target))
    assert not os.listdir(tmp_path)


def test_a_datalist_elsewhere_is_not_read_against_the_synthetic_folder(tmp_path, data) -> None:
    """`--datalist my_ds/datalist.json` without `--dataset_dir`: the default dataset_dir is a generated set whose
    file names (images/train_0000.png) the user's datalist may share."""
    mine = tmp_path / "my_ds"
    make_2d(str(mine), n_train=2, n_val=1, n_test=1, image_size=32, seed=5, preview=False)
    os.remove(mine / "params.json")  # a user's own set, not a generated one
    entries = load_datalist(str(mine / "datalist.json"), data, "training")
    assert all(e["image"].startswith(str(mine)) for e in entries)


def test_generated_folders_are_readable_and_stale_temporaries_removed(tmp_path) -> None:
    stale = tmp_path / ".set.tmp-killed"
    stale.mkdir()
    old = time.time() - 7200
    os.utime(stale, (old, old))
    ensure_dataset(str(tmp_path / "set"), "2d", n_train=2, n_val=1, n_test=1, image_size=32, preview=False)
    assert not stale.exists()
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "set").st_mode & 0o777 == 0o777 & ~mask


def test_check_inputs_accepts_good_files(data) -> None:
    with open(os.path.join(data, "datalist.json")) as f:
        entries = [{k: os.path.join(data, v) for k, v in e.items() if k in ("image", "label")}
                   for e in json.load(f)["test"]]  # fmt: skip
    check_inputs(entries, data)
    with pytest.raises(DataError, match="would overwrite"):
        check_inputs(entries + entries[:1], data)
    with pytest.raises(DataError, match="(?s)not below .*--input_root") as err:  # MONAI's writers would climb out
        check_inputs(entries, os.path.join(data, "elsewhere"))
    assert str(err.value).count("set --input_root") == 1  # every input named, the way on said once
    assert "not below" in str(err.value).splitlines()[len(entries)] and "rename" not in str(err.value)


def test_a_repeated_entry_is_mapped_once(data, tmp_path, caplog) -> None:
    """prepare_autopet over-samples its training sections: one file listed twice was refused as two inputs whose maps
    would overwrite each other, with advice to rename one of them."""
    with open(os.path.join(data, "datalist.json")) as f:
        test = [
            {k: os.path.join(data, v) for k, v in e.items() if k in ("image", "label")} for e in json.load(f)["test"]
        ]
    datalist = tmp_path / "repeated.json"
    datalist.write_text(
        json.dumps({"test": test + test[:2], "training": test + [{**test[0], "label": test[1]["label"]}]})
    )
    with caplog.at_level("INFO", logger="scripts.inference"):
        files = input_files(None, str(datalist), data, "test")
    assert [f["image"] for f in files] == [e["image"] for e in test]
    assert (
        f"{datalist}: 2 of the {len(test) + 2} entries of 'test' repeat an earlier one; each image is mapped once"
        in caplog.text
    )
    with pytest.raises(DataError, match="would overwrite"):  # the same image with another label: still refused
        input_files(None, str(datalist), data, "training")


def test_resume_checkpoints_of_a_killed_process_do_not_pile_up(tmp_path) -> None:
    written = (30, 40, 100, 50)  # in this order: the iteration in the name, not the time, says which is newest
    for step in written:
        (tmp_path / f"checkpoint_checkpoint_{step}.pt").write_bytes(b"x")
    for name in ("tmpab12_xyz", "tmp_notes.txt", "model.pt"):  # a killed save's temporary; files of other kinds
        (tmp_path / name).write_bytes(b"x")
    steps._keep_latest(str(tmp_path))
    kept = ["checkpoint_checkpoint_100.pt", "model.pt", "tmp_notes.txt"]
    assert sorted(os.listdir(tmp_path)) == kept
    assert steps.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_checkpoint_100.pt")


def test_the_size_check_reads_each_detectors_strides() -> None:
    """ILTM's VQ-VAE, the dense AE's and NSA's UNet each divide the image by the product of their strides; CutPaste's
    ResNet pools whatever it gets. The check reads plain settings (`network_strides`), not the networks: built before
    training seeds them, they would start from other weights (the kill-and-resume test of test_bundle.py shows it)."""
    import math

    from monai.bundle import ConfigParser

    from scripts.settings import SettingError, check_grid

    def factor(*layers: str) -> int:
        parser = ConfigParser()
        parser.read_config([TRAIN] + [os.path.join(ROOT, "configs", f) for f in layers])
        parser["bundle_root"] = ROOT
        return math.prod(parser.get_parsed_content("network_strides"))

    assert factor("demo.yaml") == 4 and factor("mvtec.yaml") == 8 and factor("autopet.yaml") == 8
    assert factor("demo.yaml", "baseline_dense.yaml") == 16 and factor("demo.yaml", "baseline_nsa.yaml") == 8
    assert factor("demo.yaml", "baseline_cutpaste.yaml") == 1
    check_grid([16, 16, 32], [[2, 2, 4]])  # strides per dimension
    with pytest.raises(SettingError, match=r"multiple of \[2, 2, 4\] in every dimension"):
        check_grid([16, 16, 30], [[2, 2, 4]])


def test_a_folder_whose_images_lie_deeper_says_where(tmp_path) -> None:
    """autoPET's PETCT_<subject>/<study>/SUV.nii.gz, passed as --folder at its root, got "no image files" alone."""
    study = tmp_path / "PETCT_0001" / "study"
    study.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(study / "SUV.png")
    with pytest.raises(DataError) as err:
        input_files(str(tmp_path), None, "")
    assert f"{tmp_path}: no image files (" in str(err.value)
    assert f"images lie deeper (e.g. {os.path.join('PETCT_0001', 'study', 'SUV.png')}): pass a datalist" in str(
        err.value
    )


def test_ctrl_c_in_an_engine_is_not_logged_as_an_error_with_a_traceback(capsys) -> None:
    """MONAI's StatsHandler logs whatever ends an engine with its traceback: a Ctrl-C showed 50 lines of it above the
    bundle's one-line way on. Other errors are still logged and raised; an engine without handlers is left alone."""
    from ignite.engine import Engine, Events
    from monai.handlers import StatsHandler

    from scripts.steps import quiet_interrupt

    def step(engine, batch):
        raise KeyboardInterrupt if batch == "stop" else ValueError("a bad batch")

    for batch, error in (("stop", KeyboardInterrupt), ("bad", ValueError)):
        engine = Engine(step)
        StatsHandler(name="stats", iteration_log=False, epoch_log=False).attach(engine)
        quiet_interrupt(engine, None)
        quiet_interrupt(engine)  # once, however often asked
        capsys.readouterr()
        with pytest.raises(error):
            engine.run([batch])
        out = capsys.readouterr().out  # the StatsHandler's own stream
        assert ("Exception:" in out) == (error is ValueError) and ("Traceback" in out) == (error is ValueError), out
    bare = Engine(step)
    quiet_interrupt(bare)
    assert not bare._event_handlers.get(Events.EXCEPTION_RAISED)
    with pytest.raises(KeyboardInterrupt):
        bare.run(["stop"])
