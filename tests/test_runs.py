"""scripts/runs.py: a rerun into an output folder with other data or settings stops before any work, says what
differs and how to go on; a second process is kept out; a lock left by a killed run is replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from monai.bundle import ConfigParser, run

from scripts.checkpoint import CheckpointError
from scripts.runs import RunConflict, RunGuard
from scripts.steps import RecordError
from scripts.synthetic import make_2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VQVAE_ONLY = {
    "image_size": [32, 32], "vqvae_def#channels": [8, 8], "vqvae_def#num_res_channels": [8, 8],
    "vqvae_def#num_embeddings": 16, "vqvae_def#embedding_dim": 4, "vqvae#epochs": 1, "vqvae#val_interval": 1,
    "vqvae#batch_size": 4, "transformer_def#embed_dim": 16, "transformer_def#num_layers": 1,
    "transformer_def#num_heads": 2,
}  # fmt: skip


@pytest.fixture
def data(tmp_path) -> str:
    out = str(tmp_path / "data")
    make_2d(out, n_train=4, n_val=2, n_test=1, image_size=32, preview=False)
    return out


def entries(data: str, section: str) -> list[dict]:
    with open(os.path.join(data, "datalist.json")) as f:
        return [
            {k: os.path.join(data, v) for k, v in e.items() if k in ("image", "label")} for e in json.load(f)[section]
        ]


def guard(out: str, data: str, **kwargs) -> RunGuard:
    settings = {"vqvae": {"epochs": kwargs.pop("epochs", 100)}, "seed": 0}
    return RunGuard(out, settings, entries(data, "training"), entries(data, "validation"), **kwargs)


def cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def test_a_changed_setting_stops_the_bundle_command_before_any_work(tmp_path, data, single_thread) -> None:
    out = str(tmp_path / "run")
    common = dict(config_file=os.path.join(ROOT, "configs", "train.yaml"), bundle_root=ROOT, output_dir=out,
                  dataset_dir=data, datalist=os.path.join(data, "datalist.json"), **VQVAE_ONLY)  # fmt: skip
    run("train_vqvae", **common)
    before = sorted(os.listdir(os.path.join(out, "vqvae")))
    with pytest.raises(Exception) as err:
        run("train_vqvae", **{**common, "vqvae#epochs": 2})
    message = str(cause(err.value))
    assert isinstance(cause(err.value), RunConflict)
    assert "vqvae#epochs: 1 in the run, 2 now" in message and "--output_dir" in message and "--resume True" in message
    assert sorted(os.listdir(os.path.join(out, "vqvae"))) == before and not os.path.exists(
        os.path.join(out, "run.lock")
    )
    run("train_vqvae", **common)  # the same command resumes: nothing to do
    with pytest.raises(Exception) as err:  # resumed past a change of network: its weights cannot be reused
        run("train_vqvae", **{**common, "vqvae_def#num_embeddings": 8, "resume": True})
    assert isinstance(cause(err.value), CheckpointError)
    assert "vqvae.pt: its weights do not fit this config's DropoutVQVAE" in str(cause(err.value))
    assert "--overwrite True" in str(cause(err.value))


def test_changed_data_are_named(tmp_path, data) -> None:
    out = str(tmp_path / "run")
    guard(out, data).start()
    image = entries(data, "training")[0]["image"]
    with open(image, "ab") as f:
        f.write(b"\0")
    with pytest.raises(RunConflict, match=r"training files changed since the run \(1\): .*train_0000"):
        guard(out, data).start()
    fewer = entries(data, "training")[1:]  # one image dropped from the datalist, one swapped for another
    fewer[0] = entries(data, "validation")[0]
    with pytest.raises(RunConflict) as err:
        RunGuard(out, {"vqvae": {"epochs": 100}, "seed": 0}, fewer, entries(data, "validation")).start()
    assert "training files not in the run (2): " in str(err.value) and "val_0000" in str(err.value)
    assert "training files no longer given, but in the run (4): " in str(err.value)


def test_resume_keeps_the_record_and_overwrite_moves_the_run_aside(tmp_path, data) -> None:
    out = str(tmp_path / "run")
    first = guard(out, data)
    first.start()
    first.finish()
    with open(os.path.join(out, "state.json"), "w") as f:
        json.dump({"vqvae": {}}, f)
    guard(out, data, epochs=5, resume=True).start()
    with open(os.path.join(out, "run.json")) as f:
        record = json.load(f)
    assert record["settings"]["vqvae#epochs"] == 100  # what the completed steps were made with
    # and what the later ones were (a user's resumed run trained its ILTM iterations 1 epoch, iteration 0 3, and
    # nothing said so): the summary reads it from here
    assert [(r["after_steps"], r["differences"]) for r in record["resumed"]] == [
        (["vqvae"], ["vqvae#epochs: 100 in the run, 5 now"])
    ]
    from scripts.iltm_report import _resumed

    assert "**Resumed with other settings** (--resume True, " in _resumed(out)
    assert "after the steps vqvae: the steps after them used vqvae#epochs: 100 in the run, 5 now" in _resumed(out)
    fresh = guard(out, data, epochs=5, overwrite=True)
    fresh.start()
    aside = [p for p in os.listdir(tmp_path) if p.startswith("run.replaced-")]
    assert len(aside) == 1 and os.path.isfile(tmp_path / aside[0] / "state.json")
    fresh.finish()  # `training`: the VQ-VAE stage finishes, the ILTM stage starts the same guard again
    open(os.path.join(out, "new_vqvae.pt"), "w").close()
    fresh.start()
    assert len([p for p in os.listdir(tmp_path) if p.startswith("run.replaced-")]) == 1
    assert os.path.isfile(os.path.join(out, "new_vqvae.pt"))
    with open(os.path.join(out, "run.json")) as f:
        assert json.load(f)["settings"]["vqvae#epochs"] == 5
    with pytest.raises(ValueError, match="exclude each other"):
        guard(out, data, resume=True, overwrite=True)
    with pytest.raises(TypeError, match="True or False"):
        guard(out, data, resume="false")


def test_a_folder_that_is_not_a_run_is_never_written_over(tmp_path, data, caplog) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.pt").write_bytes(b"someone's weights")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunConflict, match=r"mine holds model.pt but no run record \(run.json\)") as err:
        guard(str(out), data).start()
    assert "--overwrite True" in str(err.value) and sorted(os.listdir(out)) == ["model.pt", "notes.txt"]
    with pytest.raises(RunConflict, match="holds model.pt"):  # resuming has nothing to resume from
        guard(str(out), data, resume=True).start()
    moved = guard(str(out), data, overwrite=True)
    moved.start()
    aside = [p for p in os.listdir(tmp_path) if p.startswith("mine.replaced-")]
    assert len(aside) == 1 and (tmp_path / aside[0] / "model.pt").read_bytes() == b"someone's weights"
    moved.finish()
    other = tmp_path / "other"  # files no run writes: the run goes beside them, with a warning
    other.mkdir()
    (other / "notes.txt").write_text("unrelated")
    with caplog.at_level("WARNING", logger="scripts.runs"):
        guard(str(other), data).start()
    assert "other: holds files that are not a run's (notes.txt); the run is written beside them" in caplog.text
    events = tmp_path / "fresh" / "vqvae" / "tensorboard"  # what a stage's handlers make before the guard starts
    events.mkdir(parents=True)
    (events / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    (tmp_path / "fresh" / "config_20261202_110217.json").write_text("{}")  # MONAI's copy, with --tracking mlflow
    caplog.clear()
    with caplog.at_level("WARNING", logger="scripts.runs"):
        guard(str(tmp_path / "fresh"), data).start()
    assert not caplog.text


def test_a_run_of_another_detector_is_kept_even_with_resume(tmp_path, data) -> None:
    """Following the advice to resume in a baseline's folder replaced the baseline's detector with ILTM's."""
    out = str(tmp_path / "run")
    nsa = guard(out, data, detector={"segmenter_def": {"channels": [4, 8]}})
    nsa.start()
    nsa.finish()
    for resume in (False, True):
        with pytest.raises(RunConflict, match="holds a run of the NSA baseline's detector, and this training builds "
                                              r"the ILTM detector \(VQ-VAE \+ Transformer\)") as err:  # fmt: skip
            guard(out, data, detector={"vqvae_def": {"channels": [8, 8]}}, resume=resume).start()
        assert "--overwrite True" in str(err.value) and "--resume True to continue" not in str(err.value)
    guard(out, data, detector={"segmenter_def": {"channels": [4, 8]}}).start()  # the same kind still resumes
    classifier = {"classifier_def": {"channels": [4]}}  # CutPaste and STKD: one network, told apart by their settings
    cutpaste = RunGuard(str(tmp_path / "cp"), {"cutpaste": {"epochs": 2}}, entries(data, "training"), [], classifier)
    cutpaste.start()
    cutpaste.finish()
    stkd = {"cutpaste": {"epochs": 2}, "stkd": {"rounds": 2}}
    with pytest.raises(
        RunConflict, match="a run of the CutPaste baseline's detector, and this training builds the STKD"
    ):
        RunGuard(str(tmp_path / "cp"), stkd, entries(data, "training"), [], classifier, resume=True).start()


def test_resume_names_what_it_resumes_past_once(tmp_path, data, caplog) -> None:
    """--resume True keeps the completed steps: it says which settings they keep, once per command."""
    out = str(tmp_path / "run")
    first = guard(out, data)
    first.start()
    first.finish()
    resumed = guard(out, data, epochs=5, resume=True)
    with caplog.at_level("WARNING", logger="scripts.runs"):
        resumed.start()
        resumed.finish()
        resumed.start()  # `training` starts the guard again for its ILTM stage
    assert (
        caplog.text.count("resuming despite 1 differences") == 1
        and "vqvae#epochs: 100 in the run, 5 now" in caplog.text
    )
    resumed.finish()


def test_an_export_path_that_cannot_be_written_stops_training_first(tmp_path) -> None:
    from scripts.files import check_target

    (tmp_path / "afile").write_text("x")
    export = str(tmp_path / "afile" / "model.pt")
    config = {"iltm": {"export": export}, "check": "$scripts.files.check_target(@iltm#export, 'iltm#export')"}
    with pytest.raises(RuntimeError) as raised:  # MONAI's wrapper; the bundle's message is its cause's
        ConfigParser(config, globals={"scripts": "scripts"}).get_parsed_content("check")  # as configs/train.yaml
    assert "iltm#export cannot be written there" in str(raised.value.__cause__)
    assert str(raised.value.__cause__).endswith("set --iltm#export to a writable file")
    with pytest.raises(OSError, match="it is a folder"):
        check_target(str(tmp_path), "iltm#export")
    check_target(str(tmp_path / "new" / "model.pt"), "iltm#export")  # its folder is made
    assert (tmp_path / "new").is_dir()


def test_a_second_process_is_kept_out_and_a_stale_lock_replaced(tmp_path, data, monkeypatch) -> None:
    out = str(tmp_path / "run")
    os.makedirs(out)
    lock = os.path.join(out, "run.lock")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(lock, "w") as f:
            json.dump({"pid": holder.pid, "host": os.uname().nodename, "started": "earlier"}, f)
        with pytest.raises(RunConflict, match=f"in use: process {holder.pid}"):
            guard(out, data).start()
    finally:
        holder.kill()
        holder.wait()
    g = guard(out, data)  # the holder is gone: its lock is stale
    created = []
    link = os.link
    monkeypatch.setattr(os, "link", lambda src, dst: (created.append(open(src).read()), link(src, dst)))
    g.start()
    assert json.loads(created[0])["pid"] == os.getpid()  # the lock appears whole: nobody ever reads it empty
    with open(lock) as f:
        assert json.load(f)["pid"] == os.getpid()
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    g.finish()
    assert not os.path.exists(lock)


def test_a_run_that_ends_in_an_error_or_ctrl_c_releases_its_lock(tmp_path, data) -> None:
    """Ctrl-C left run.lock, and the next run warned of "a run that is gone" (a user's pass)."""
    out = str(tmp_path / "run")
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r}); from test_runs import guard; "
            f"guard({out!r}, {data!r}).start(); raise KeyboardInterrupt")  # fmt: skip
    here = os.path.dirname(os.path.abspath(__file__))
    ended = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, timeout=120)
    assert "KeyboardInterrupt" in ended.stderr and os.path.isfile(os.path.join(out, "run.json"))
    assert not os.path.exists(os.path.join(out, "run.lock"))


def test_an_unreadable_record_is_named(tmp_path, data) -> None:
    out = str(tmp_path / "run")
    os.makedirs(out)
    with open(os.path.join(out, "run.json"), "w") as f:
        f.write('{"settings": ')
    with pytest.raises(RecordError, match="run.json: unreadable"):
        guard(out, data).start()


def test_an_output_folder_that_cannot_be_written_is_named(tmp_path, data, monkeypatch) -> None:
    """A read-only folder (simulated: the tests may run as root, who can write anywhere)."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "makedirs", refuse)
    with pytest.raises(RunConflict, match=r"run: cannot write into the output folder .*writable --output_dir"):
        guard(str(tmp_path / "run"), data).start()
    monkeypatch.undo()  # a pseudo file system: no such folder can be made
    with pytest.raises(RunConflict, match=r"/proc/iltm_run: cannot write into the output folder"):
        guard("/proc/iltm_run", data).start()


def test_the_lock_works_where_the_file_system_has_no_hard_links(tmp_path, data, monkeypatch) -> None:
    def no_links(src, dst):
        raise PermissionError("Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    out = str(tmp_path / "run")
    g = guard(out, data)
    g.start()
    with open(os.path.join(out, "run.lock")) as f:
        assert json.load(f)["pid"] == os.getpid()
    assert sorted(os.listdir(out)) == ["run.json", "run.lock"]
    g.finish()
