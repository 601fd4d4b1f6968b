"""scripts/cli.py and the bundle command line: a misspelled override stops the run before any work and names the
closest ids; the last line of a failure is its cause."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from scripts.cli import UnknownSetting, check_overrides, command_line_ids, fire_main, unknown_ids
from scripts.data import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN, DEMO, INFERENCE = (os.path.join(ROOT, "configs", f) for f in ("train.yaml", "demo.yaml", "inference.yaml"))


def test_command_line_ids() -> None:
    argv = ["run", "training", "--config_file", f"['{TRAIN}','{DEMO}']", "--vqvae#epochs", "2", "--seed=3",
            "--tracking", "mlflow", "--meta_file", "m.json"]  # fmt: skip
    assert command_line_ids(argv) == ([TRAIN, DEMO], ["vqvae#epochs", "seed"])
    assert command_line_ids(["run", "--config_file", TRAIN]) == ([TRAIN], [])


def test_unknown_ids_get_the_closest_suggestions() -> None:
    assert unknown_ids([TRAIN, DEMO], ["vqvae#epochs", "iltm#mask_num_samples", "synthetic#n_train"]) == []
    (message,) = unknown_ids([TRAIN, DEMO], ["vqvae#epoch"])
    assert message.startswith("--vqvae#epoch: no such setting") and "did you mean vqvae#epochs" in message
    (message,) = unknown_ids([INFERENCE], ["num_sample"])
    assert "num_samples" in message
    # a training command's overrides copied to evaluation (as the checkpoint error's advice reads): named as such,
    # not "did you mean imports#9" (a user's pass)
    (message,) = unknown_ids([INFERENCE, DEMO], ["iltm#export"])
    assert message == "--iltm#export: a training setting (configs/train.yaml): inference and evaluation do not read " \
        "it; drop it"  # fmt: skip
    (message,) = unknown_ids([TRAIN, DEMO], ["folder_pattern"])
    assert "an inference setting (configs/inference.yaml): training does not read it" in message
    (message,) = unknown_ids([INFERENCE], ["import"])
    assert "imports#" not in message
    with pytest.raises(UnknownSetting, match="--allow_new_ids True"):
        check_overrides(False, ["run", "--config_file", TRAIN, "--vqvae#epoch", "2"])
    check_overrides(True, ["run", "--config_file", TRAIN, "--my_new_id", "2"])


def test_a_suggestion_is_an_id_the_command_line_accepts() -> None:
    """An id that only passes a setting on to its component is refused when set, so it is never suggested, and its
    refusal does not say that MONAI would add it as a new id."""
    (message,) = unknown_ids([TRAIN, DEMO], ["iltm#max_iteration"])
    assert "iltm#max_iterations" in message and "iltm#workflow#" not in message
    with pytest.raises(UnknownSetting, match="only passes on iltm#max_iterations") as refused:
        check_overrides(False, ["run", "--config_file", TRAIN, "--iltm#workflow#max_iterations", "1"])
    assert "MONAI would add" not in str(refused.value)


def test_the_command_line_stops_before_any_work_and_ends_with_the_cause(tmp_path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", f"['{TRAIN}','{DEMO}']",
           "--output_dir", str(out), "--dataset_dir", str(tmp_path / "no_data"), "--vqvae#epoch", "2"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Cause: UnknownSetting:") or "did you mean vqvae#epochs" in result.stderr
    assert "did you mean vqvae#epochs" in result.stderr
    assert not out.exists() and not (tmp_path / "no_data").exists()  # nothing was generated or trained


def test_renamed_ids_are_named_with_their_new_names(tmp_path) -> None:
    (message,) = unknown_ids([TRAIN, DEMO], ["iltm_max_iterations"])
    assert message == "--iltm_max_iterations: renamed iltm#max_iterations in version 0.3.0"
    old_preset = tmp_path / "mine.yaml"
    old_preset.write_text("threshold_decay: 0.2\n")
    with pytest.raises(UnknownSetting, match="set threshold_decay: renamed iltm#threshold_decay") as refused:
        check_overrides(False, ["run", "--config_file", f"['{TRAIN}','{old_preset}']"])
    assert "--allow_new_ids True" in str(refused.value)  # MONAI would add the old id as a new one that nothing reads
    (message,) = unknown_ids([TRAIN, DEMO], ["transformer#stage#epochs"])
    assert message == "--transformer#stage#epochs: renamed transformer#epochs in version 0.4.0"
    old_preset.write_text("loading:\n  _target_: Compose\n  transforms: []\n")
    with pytest.raises(UnknownSetting, match="set loading: renamed preprocessing in version 0.4.0"):
        check_overrides(False, ["run", "--config_file", f"['{TRAIN}','{old_preset}']"])


def test_diagnose_refuses_an_argument_it_does_not_have(tmp_path) -> None:
    """`--json out.json` (the argument is `--json_path`) must not become a silent config id."""
    from scripts.diagnose import diagnose

    with pytest.raises(UnknownSetting, match="--json: no such setting"):
        diagnose([TRAIN, DEMO], checkpoint=str(tmp_path / "none.pt"), json=str(tmp_path / "out.json"))


def test_diagnose_refuses_a_baseline_with_a_message(tmp_path) -> None:
    from scripts.diagnose import diagnose

    nsa = os.path.join(ROOT, "configs", "baseline_nsa.yaml")
    with pytest.raises(ValueError, match=r"none.pt: diagnose measures an ILTM detector.* a baseline \(Segment"):
        diagnose([TRAIN, DEMO, nsa], checkpoint=str(tmp_path / "none.pt"), bundle_root=ROOT)


def test_an_argument_that_only_passes_a_setting_on_is_refused() -> None:
    """One id per setting: `iltm#workflow#min_iterations` is `@iltm#min_iterations`; overriding it would bypass the
    setting that run.json records. A setting whose default is another setting stays a setting of its own."""
    (message,) = unknown_ids([TRAIN, DEMO], ["iltm#workflow#min_iterations"])
    assert "set --iltm#min_iterations" in message
    (message,) = unknown_ids([TRAIN, DEMO], ["transformer#trainer#max_epochs"])
    assert "set --transformer#epochs" in message
    assert unknown_ids([TRAIN, DEMO], ["iltm#mask_density_threshold", "transformer#epochs", "num_samples"]) == []
    (message,) = unknown_ids([INFERENCE], ["network_def#num_samples"])
    assert "set --num_samples" in message


def test_the_documented_ablation_override_is_a_setting() -> None:
    """`--network_def#resample False` (the sweep's no-resampling ablation) must pass the command-line check."""
    assert unknown_ids([INFERENCE, os.path.join(ROOT, "configs", "evaluate.yaml")], ["network_def#resample"]) == []
    assert unknown_ids([TRAIN, DEMO], ["network_def#resample"]) == []


def test_diagnose_shows_its_usage() -> None:
    """fire needs the function's own signature to say what diagnose takes (a `**kwargs` wrapper crashed instead)."""
    result = subprocess.run([sys.executable, "-m", "scripts.diagnose", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PAGER": "cat"})  # fmt: skip
    shown = result.stdout + result.stderr
    assert "diagnose.py CONFIG_FILE CHECKPOINT" in shown and "Traceback" not in shown


def test_a_script_ends_a_bad_input_with_its_message_not_a_traceback(tmp_path) -> None:
    missing = str(tmp_path / "missing")
    cmd = [sys.executable, "-m", "scripts.prepare_mvtec", missing, str(tmp_path / "out")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {missing}: MVTec AD folder not found"


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("scripts.prepare_autopet", ["{missing}", "{out}"], "{missing}: autoPET folder not found"),
        ("scripts.experiments", ["report", "--exp_dir", "{missing}"], "{missing}: no such folder"),
        # a misspelt flag stops the command before any work (fire ran it with the flags it knew, then complained)
        (
            "scripts.synthetic",
            ["make_2d", "--out_dir", "{out}", "--ntrain", "5"],
            "no such option: --ntrain (did you mean --n_train?); make_2d takes --out_dir, --n_train",
        ),
        ("scripts.prepare_mvtec", ["{missing}", "{out}", "--ratio", "0.4"], "no such option: --ratio (did you mean"),
        (
            "scripts.experiments",
            ["run", "--exp_dir", "{out}", "--kind", "4d"],
            "unknown kind '4d'",
        ),  # raised in __main__
        ("scripts.experiments", ["run", "--exp_dir", "{out}", "--preset", "{missing}"], "{missing}: preset not found"),
        ("scripts.synthetic", ["mask_recall", "--run_dir", "{missing}", "--data_dir", "{out}"], "{missing}: no iltm"),
    ],
)
def test_every_script_command_shares_that_ending(tmp_path, monkeypatch, capsys, module, argv, message) -> None:
    """The same as above in-process (each command line as `python -m MODULE ...` would run it)."""
    import runpy

    paths = {"missing": str(tmp_path / "missing"), "out": str(tmp_path / "out")}
    monkeypatch.setattr(sys, "argv", [module, *(a.format(**paths) for a in argv)])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    assert stop.value.code == 1
    assert capsys.readouterr().err.startswith(f"error: {message.format(**paths)}")
    assert not os.path.exists(paths["out"]) or argv[0] == "mask_recall"  # nothing made


def test_a_bug_keeps_its_traceback(capsys) -> None:
    """Only what a `raise` of the bundle's code raised loses its traceback, also when MONAI's config parser wrapped it.
    A ValueError from a failing call or unpacking in the bundle's own code, or a TypeError, is a bug and keeps it."""
    bundle_code = {"__name__": "scripts.example"}  # functions as if defined in a module of the bundle
    exec(  # noqa: S102 - a fixed snippet
        "def unpack():\n    a, b = [1, 2, 3]\n\n"
        "def lookup():\n    return [1].index(5)\n\n"
        "def deliberate():\n    raise ValueError('x.png: cannot be read')\n",
        bundle_code,
    )
    monai_code = {"__name__": "monai.bundle.example"}  # as MONAI's config parser wraps what an expression raised
    exec(  # noqa: S102 - a fixed snippet
        "def parse(expression):\n    try:\n        expression()\n"
        "    except Exception as e:\n        raise RuntimeError('Failed to evaluate ConfigExpression') from e\n",
        monai_code,
    )
    bundle_code["wrapped"] = lambda: monai_code["parse"](bundle_code["deliberate"])
    for name, error in (("unpack", ValueError), ("lookup", ValueError)):
        with pytest.raises(error):
            fire_main(bundle_code[name], command=[])
    with pytest.raises(TypeError):
        fire_main(lambda: None + 1, command=[])
    for name in ("deliberate", "wrapped"):
        with pytest.raises(SystemExit) as stop:
            fire_main(bundle_code[name], command=[])
        assert stop.value.code == 1 and capsys.readouterr().err == "error: x.png: cannot be read\n"


def test_a_data_error_ends_a_script_once(capsys, caplog) -> None:
    """A DataError logs itself where MONAI's parser would bury it in a traceback; a script's ending says it instead."""

    def bad_input() -> None:
        raise DataError("x.png: cannot be read", "Replace it.")

    with caplog.at_level("ERROR"), pytest.raises(SystemExit):
        fire_main(bad_input, command=[])
    assert capsys.readouterr().err == "error: x.png: cannot be read Replace it.\n" and not caplog.records
    assert DataError.quiet is False


def test_the_flag_check_reads_the_command_fire_is_given(monkeypatch, capsys) -> None:
    """`fire_main(..., command=...)` (as the tests call it) is checked, not the process's own arguments (pytest's)."""
    from scripts.cli import fire_main

    monkeypatch.setattr(sys, "argv", ["pytest", "--tb=line", "--rootdir", "x"])
    fire_main(lambda n_train=1: print(f"n_train={n_train}"), command=["--n_train", "3"])
    assert capsys.readouterr().out.strip() == "n_train=3"
    with pytest.raises(SystemExit):
        fire_main(lambda: None, command="--ntrain 3")
    assert "no such option: --ntrain; <lambda> takes no options" in capsys.readouterr().err
