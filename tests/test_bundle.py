"""The bundle as users run it: metadata, the VQ-VAE stage (2D and 3D), and the whole ILTM pipeline with resume."""

import csv
import json
import os
import shutil

import pytest
import torch
import yaml
from monai.bundle import ConfigParser, run, verify_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
SCHEMA = os.path.join(ROOT, "..", "shared", "schemas", "meta_schema_20240725.json")


def _config(*names):
    return [os.path.join(CONFIGS, n) for n in names]


def test_metadata_validates_against_the_bundle_schema():
    if not os.path.isfile(SCHEMA):
        pytest.skip("../shared/schemas/meta_schema_20240725.json is not present beside the checkout")
    import jsonschema

    with open(SCHEMA) as f:
        schema = json.load(f)
    with open(os.path.join(CONFIGS, "metadata.json")) as f:
        metadata = json.load(f)
    jsonschema.validate(metadata, schema)
    assert metadata["schema"].endswith("meta_schema_20240725.json")
    assert metadata["version"] in metadata["changelog"]
    for word in ("detection", "deepedit", "deepgrow", "classification"):  # MONAI Label routes such names elsewhere
        assert word not in metadata["name"].lower()


def test_model_zoo_min_verification(tmp_path):
    """What the Model Zoo's CI checks in `min` mode: the files a bundle must have, the version in the changelog, and
    MONAI's `verify_metadata` against the schema (read from ../shared, never downloaded)."""
    for path in ("configs/metadata.json", "LICENSE", "docs/README.md", "large_files.yml"):
        assert os.path.isfile(os.path.join(ROOT, path)), path
    assert any(os.path.isfile(os.path.join(CONFIGS, f"inference.{ext}")) for ext in ("json", "yaml", "yml"))
    with open(os.path.join(ROOT, "large_files.yml")) as f:  # weights are trained, not shipped: described here
        assert "models/model.pt" in [entry["path"] for entry in yaml.safe_load(f)["large_files"]]
    with open(os.path.join(CONFIGS, "metadata.json")) as f:
        metadata = json.load(f)
    assert metadata["version"] in metadata["changelog"]
    if not os.path.isfile(SCHEMA):
        pytest.skip("../shared/schemas/meta_schema_20240725.json is not present beside the checkout")
    schema = tmp_path / "schema.json"
    shutil.copyfile(SCHEMA, schema)
    verify_metadata(meta_file=os.path.join(CONFIGS, "metadata.json"), filepath=str(schema))


TINY_2D = {
    "synthetic#n_train": 12,
    "synthetic#n_val": 4,
    "synthetic#n_test": 4,
    "synthetic#image_size": 32,
    "image_size": [32, 32],
    "vqvae_def#channels": [16, 32],
    "vqvae_def#num_res_channels": [16, 32],
    "vqvae_def#num_embeddings": 32,
    "vqvae_def#embedding_dim": 8,
    "vqvae#batch_size": 4,
    "transformer_def#embed_dim": 16,
    "transformer_def#num_layers": 1,
    "transformer_def#num_heads": 2,
    "transformer#epochs": 2,
    "transformer#val_interval": 1,
    "num_samples": 2,
    "num_decodes": 1,
}


def cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _untrained_l1(configs, overrides):
    """Validation L1 of the VQ-VAE as initialised (same seed): the baseline its training must beat."""
    parser = ConfigParser()
    parser.read_config(configs)
    parser.update(overrides)
    torch.manual_seed(parser["seed"])
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    return evaluator.state.metrics["val_l1"]


@pytest.mark.parametrize("preset", ["demo.yaml", "demo3d.yaml"])
def test_vqvae_stage_trains_through_the_bundle_command(tmp_path, preset):
    overrides = {"bundle_root": ROOT, "dataset_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out")}
    if preset == "demo.yaml":
        overrides.update({k: v for k, v in TINY_2D.items() if k.startswith(("synthetic", "image", "vqvae"))})
    else:
        overrides.update(
            {
                "synthetic#n_train": 6,
                "synthetic#n_val": 2,
                "synthetic#n_test": 2,
                "synthetic#grid": [16, 16, 32],
                "image_size": [16, 16, 32],
                "vqvae#batch_size": 2,
            }
        )
    overrides.update({"vqvae#epochs": 2, "vqvae#val_interval": 1})
    configs = _config("train.yaml", preset)
    before = _untrained_l1(configs, overrides)
    run("train_vqvae", config_file=configs, **overrides)
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    assert state["vqvae"]["val_l1"] < before
    assert state["vqvae"]["val_codes_used"] > 1  # the codebook did not collapse onto one code
    assert {"val_l1_anomaly", "val_l1_normal", "val_l1_matched"} <= set(state["vqvae"])
    assert (tmp_path / "out" / "vqvae" / "vqvae.pt").is_file()


def test_the_stage_record_validates_the_final_weights_whatever_the_interval(tmp_path):
    """val_interval above the epochs: the record still holds the validation metrics of the weights it saved."""
    overrides = {"bundle_root": ROOT, "dataset_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"),
                 **TINY_2D, "vqvae#epochs": 1, "vqvae#val_interval": 5}  # fmt: skip
    run("train_vqvae", config_file=_config("train.yaml", "demo.yaml"), **overrides)
    state = json.loads((tmp_path / "out" / "state.json").read_text())["vqvae"]
    assert state["val_l1"] > 0 and state["val_codes_used"] >= 1 and "val_l1_anomaly" in state


def _pipeline(tmp_path, name, **extra):
    out = tmp_path / name
    overrides = {
        "bundle_root": ROOT,
        "dataset_dir": str(tmp_path / "data"),
        "output_dir": str(out),
        "iltm#export": str(out / "exported.pt"),
        "vqvae#epochs": 2,
        "vqvae#val_interval": 2,
        "iltm#max_iterations": 2,
        "iltm#stop_tolerance": 0.0,
        **TINY_2D,
        **extra,
    }
    run("training", config_file=_config("train.yaml", "demo.yaml"), **overrides)
    return out


def _final(out):
    masks = [torch.load(out / "iltm" / f"iter_{k:02d}" / "token_masks.pt", weights_only=True) for k in (1, 2)]
    return torch.load(out / "model.pt", weights_only=True)["model"], masks


def test_iltm_pipeline_writes_every_artefact_and_resumes_after_a_kill(tmp_path, monkeypatch):
    whole = _pipeline(tmp_path, "whole")
    for path in [
        "vqvae/vqvae.pt",
        "model.pt",
        "exported.pt",
        "state.json",
        "iltm/summary.md",
        "iltm/summary.csv",
        "iltm/progress.png",
        "iltm/mask_panel.png",
        "iltm/transformer_init.pt",
    ]:
        assert (whole / path).is_file(), path
    for k in range(3):
        for name in ("transformer.pt", "model.pt"):
            assert (whole / "iltm" / f"iter_{k:02d}" / name).is_file()
    exported = torch.load(whole / "exported.pt", weights_only=True)  # weights and the settings inference rebuilds from
    assert exported["settings"]["vqvae_def#channels"] == TINY_2D["vqvae_def#channels"]
    assert exported["settings"]["image_size"] == TINY_2D["image_size"] and set(exported["model"]) > {
        "vqvae.codebook_initialised"
    }
    state = json.loads((whole / "state.json").read_text())
    assert {"vqvae", "transformer_00", "masks_01", "transformer_01", "masks_02", "transformer_02"} <= set(state)
    for k in (1, 2):
        info = state[f"masks_{k:02d}"]
        assert info["masked_tokens"] >= 0 and "precision" in info and "recall" in info
        assert {"flag_precision", "flag_recall", "val_masked_tokens", "density_threshold"} <= set(info)
        val_masks = torch.load(whole / "iltm" / f"iter_{k:02d}" / "val_token_masks.pt", weights_only=True)
        assert len(val_masks) == 4 and info["val_masked_tokens"] == sum(int(m.sum()) for m in val_masks.values())
        masks = torch.load(whole / "iltm" / f"iter_{k:02d}" / "token_masks.pt", weights_only=True)
        assert info["masked_tokens"] == sum(int(m.sum()) for m in masks.values())  # the count is of the saved masks
        assert info["threshold"] == pytest.approx(0.005 * 0.875 ** (k - 1))
    assert os.listdir(whole / "iltm" / "tensorboard")
    checks = state["checks_02"]  # "Can ILTM help here?": computed once per final iteration, rendered into the summary
    assert {"first_stage", "masks", "map_source"} <= set(checks)
    restriction = checks["restriction"]  # the default unrestricted map, and the restricted one's AUPRO beside it
    assert (
        restriction["restricted"] is False and restriction["images"] == 4 and 0 <= restriction["unflagged_images"] <= 4
    )
    assert 0 <= restriction["aupro_other"] <= 1
    assert len(checks["masks"]["unlearning_per_iteration"]) == 2
    outcome = checks["outcome"]  # labelled validation images, normal and anomalous: AUPRO and image AUROC
    assert outcome["normal_images"] > 0 and outcome["normal_images"] + outcome["anomalous_images"] == 4
    assert all(0 <= outcome[k] <= 1 for k in ("aupro_final", "image_auroc_iteration_0", "image_auroc_final"))
    assert outcome["images_better"] + outcome["images_worse"] <= outcome["anomalous_images"]  # each scored alone
    assert "masks_00" not in state  # iteration 0 trained on every token: no given masks to report in row 0
    assert checks["masks"]["masked_tokens"] == [state["masks_01"]["masked_tokens"], state["masks_02"]["masked_tokens"]]
    summary = (whole / "iltm" / "summary.md").read_text()
    assert "## Can ILTM help here?" in summary and "flag_precision" in summary
    assert f"; image AUROC {outcome['image_auroc_iteration_0']:.3f} at iteration 0" in summary
    changed = outcome["images_better"] + outcome["images_worse"]
    split = f"the final iteration higher on {outcome['images_better']}, lower on {outcome['images_worse']}"
    assert (split if changed else "no image's own AUPRO changed") in summary
    assert ("sign test p = " in summary) == (outcome["images_better"] + outcome["images_worse"] > 0)
    with open(whole / "iltm" / "summary.csv", newline="") as f:  # each Transformer's kept, best validated epoch
        table = list(csv.DictReader(f))
    kept = [row["epoch"] for row in table]
    assert table[0]["precision"] == "" and "nan" not in str(table)  # iteration 0 has no masks: an empty cell
    assert kept == [str(state[f"transformer_{k:02d}"]["best_epoch"]) for k in range(3)]
    assert all(1 <= int(e) <= TINY_2D["transformer#epochs"] for e in kept)
    assert not list(whole.glob("iltm/iter_*/best.pt"))
    assert "on normal voxels of the same intensities" in summary

    # The diagnostics of any checkpoint on a labelled section, the first stage's fidelity among them.
    from scripts.diagnose import diagnose

    overrides = {"bundle_root": ROOT, "dataset_dir": str(tmp_path / "data"), **TINY_2D}
    found = diagnose(_config("train.yaml", "demo.yaml"), str(whole / "iltm" / "iter_00" / "model.pt"),
                     section="validation", **overrides)  # fmt: skip
    stage, validated = found["first_stage"], state["vqvae"]  # the same VQ-VAE on the same images as its validation
    for name in ("l1_anomaly", "l1_normal", "l1_matched"):
        assert stage[name] == pytest.approx(validated[f"val_{name}"], rel=1e-4), name
    assert stage["l1_ratio_matched"] == pytest.approx(stage["l1_anomaly"] / stage["l1_matched"])
    assert found["full"]["masks_any"]["masked"] >= 0 and 0 <= found["full"]["aupro"] <= 1
    assert 0 <= found["full"]["token_auroc"] <= 1 and "token_auroc" not in found["no_resampling"]
    assert 0 <= found["full"]["token_auroc_anomalies_out_of_context"] <= 1
    assert found["settings"]["num_samples"] == TINY_2D["num_samples"]  # what the numbers were measured with
    # its masks are the training's where N, M and thresholds are the mask passes' (the run's masks are restricted to
    # flags while its maps are not: diagnose used to mask from the inference map, recall 1.0 against the run's 0.44)
    as_masked = diagnose(_config("train.yaml", "demo.yaml"), str(whole / "iltm" / "iter_00" / "model.pt"),
                         section="training", **{**overrides, "num_samples": 16, "num_decodes": 4})  # fmt: skip
    assert as_masked["settings"]["mask_restrict_to_flags"] is True
    first = [state["masks_01"][k] for k in ("masked_tokens", "precision", "recall")]  # NaN recorded as None
    found_masks = [None if v != v else v for v in as_masked["full"]["masks_any"].values()]
    assert found_masks == pytest.approx(first)
    # inference.yaml alone: the checkpoint given to diagnose is the one whose recorded settings build the detector
    data = str(tmp_path / "data")
    again = diagnose(_config("inference.yaml"), str(whole / "iltm" / "iter_00" / "model.pt"), section="validation",
                     bundle_root=ROOT, dataset_dir=data, datalist=os.path.join(data, "datalist.json"))  # fmt: skip
    assert again["first_stage"] == pytest.approx(stage, rel=1e-5)
    from scripts.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"image_size: trained with \[32, 32\], this config has \[64, 64\]"):
        diagnose(_config("train.yaml", "demo.yaml"), str(whole / "iltm" / "iter_00" / "model.pt"),
                 section="validation", **{**overrides, "image_size": [64, 64]})  # fmt: skip
    from scripts.data import DataError

    with open(os.path.join(data, "datalist.json")) as f:
        normal = [e for e in json.load(f)["validation"] if not e["anomalous"]]
    (tmp_path / "data" / "normal.json").write_text(json.dumps({"validation": normal}))
    for section, says in (
        ("validation", "no labelled anomalous voxel in section 'validation'"),
        ("valid", "--section"),
    ):
        with pytest.raises(DataError, match=says) as err:  # before any map, and in diagnose's own words
            diagnose(_config("train.yaml", "demo.yaml"), str(whole / "iltm" / "iter_00" / "model.pt"),
                     section=section, **{**overrides, "datalist": str(tmp_path / "data" / "normal.json")})  # fmt: skip
        assert "--data_section" not in str(err.value)

    # Kill the same run in the middle of ILTM iteration 1's mask generation, then rerun the same command.
    from scripts import iltm

    calls = {"n": 0}
    original = iltm.AnomalyDetector.infer

    def dying_infer(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(iltm.AnomalyDetector, "infer", dying_infer)
    with pytest.raises(BaseException, match="killed"):
        _pipeline(tmp_path, "killed", **{"iltm#mask_batch_size": 4})
    monkeypatch.setattr(iltm.AnomalyDetector, "infer", original)
    killed_state = json.loads((tmp_path / "killed" / "state.json").read_text())
    assert "transformer_00" in killed_state and "masks_01" not in killed_state
    resumed = _pipeline(tmp_path, "killed", **{"iltm#mask_batch_size": 4})

    (weights_a, masks_a), (weights_b, masks_b) = _final(whole), _final(resumed)
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    for a, b in zip(masks_a, masks_b):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # A rerun of the finished run retrains nothing and leaves the export alone (a later run may have exported
    # since); only an export that is gone is written again.
    (whole / "exported.pt").write_bytes(b"a later run's detector")
    _pipeline(tmp_path, "whole")
    assert (whole / "exported.pt").read_bytes() == b"a later run's detector"
    (whole / "model.pt").unlink()
    _pipeline(tmp_path, "whole")
    assert (whole / "exported.pt").read_bytes() == b"a later run's detector"
    assert torch.equal(torch.load(whole / "model.pt", weights_only=True)["model"][key], weights_a[key])

    # Settings lowered on the finished run would end it an iteration earlier: refused, nothing replaced. Raised, the
    # run trains one more iteration, and its checks and summary are those of the new final iteration.
    from scripts.runs import RunConflict

    exported = (whole / "exported.pt").read_bytes()
    with pytest.raises(Exception) as err:
        _pipeline(tmp_path, "whole", **{"iltm#max_iterations": 1, "iltm#min_iterations": 1})
    assert isinstance(cause(err.value), RunConflict) and "has trained ILTM iteration 2" in str(cause(err.value))
    assert (whole / "exported.pt").read_bytes() == exported
    assert torch.equal(torch.load(whole / "model.pt", weights_only=True)["model"][key], weights_a[key])
    _pipeline(tmp_path, "whole", **{"iltm#max_iterations": 3})
    state = json.loads((whole / "state.json").read_text())
    assert len(state["checks_03"]["masks"]["masked_tokens"]) == 3
    assert "# ILTM iterations (final: 3)" in (whole / "iltm" / "summary.md").read_text()
    final = torch.load(whole / "iltm" / "iter_03" / "model.pt", weights_only=True)["model"]
    assert torch.equal(torch.load(whole / "model.pt", weights_only=True)["model"][key], final[key])

    # The report comes before the export: a run killed in between has no model.pt, which the experiments runner
    # reads as "not finished" (it skips runs with one), so the rerun writes both.
    (whole / "model.pt").unlink()
    (whole / "iltm" / "summary.md").unlink()
    monkeypatch.setattr(iltm, "write_report", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(BaseException, match="killed"):
        _pipeline(tmp_path, "whole", **{"iltm#max_iterations": 3})
    assert not (whole / "model.pt").exists()
    monkeypatch.undo()
    _pipeline(tmp_path, "whole", **{"iltm#max_iterations": 3})
    assert (whole / "model.pt").is_file() and (whole / "iltm" / "summary.md").is_file()


def test_a_run_that_stops_on_empty_first_masks_still_reports_them(tmp_path, monkeypatch):
    """No map of a training image falls below the mask density threshold and the stopping rule ends the run at
    iteration 0 (0 -> 0 masked tokens): the summary still says that ILTM masked nothing. (Its codebook taken as
    collapsed, the checks also measure the training images' intensity band, which the warning names.)"""
    from scripts import iltm_checks

    monkeypatch.setattr(iltm_checks, "collapsed", lambda stage: True)
    out = _pipeline(tmp_path, "empty", **{"iltm#mask_density_threshold": 1e-30, "iltm#min_iterations": 0})
    state = json.loads((out / "state.json").read_text())
    assert state["masks_01"]["masked_tokens"] == 0 and "transformer_01" not in state and "checks_00" in state
    stage = state["checks_00"]["first_stage"]
    assert stage["intensity_range"] == [0.0, 255.0] and 0 <= stage["intensity_band"][0] < stage["intensity_band"][1]
    summary = (out / "iltm" / "summary.md").read_text()
    assert "# ILTM iterations (final: 0)" in summary and "ILTM masked no training token in any pass" in summary
    assert "The codebook has collapsed" in summary

    # One forced iteration more: its masks are iteration 0's (none), so iteration 0's Transformer is reused, as
    # retraining it from the same initial weights and seeds would give it again; the summary says so.
    _pipeline(tmp_path, "empty", **{"iltm#mask_density_threshold": 1e-30, "iltm#min_iterations": 1})
    state = json.loads((out / "state.json").read_text())
    assert state["transformer_01"]["same_masks_as"] == 0 and state["transformer_01"]["wall_time_s"] == 0.0
    assert state["transformer_01"]["val_loglik"] == state["transformer_00"]["val_loglik"]
    weights = [torch.load(out / "iltm" / f"iter_{k:02d}" / "model.pt", weights_only=True)["model"] for k in (0, 1)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    summary = (out / "iltm" / "summary.md").read_text()
    assert "# ILTM iterations (final: 1)" in summary and "| final (masks of iteration 0: its model) |" in summary
    from scripts.iltm import ILTMWorkflow

    monkeypatch.setattr(ILTMWorkflow, "_reuse", lambda *args: None)  # retrained: the very same weights
    again = _pipeline(tmp_path, "again", **{"iltm#mask_density_threshold": 1e-30, "iltm#min_iterations": 1})
    retrained = torch.load(again / "iltm" / "iter_01" / "model.pt", weights_only=True)["model"]
    assert "same_masks_as" not in json.loads((again / "state.json").read_text())["transformer_01"]
    assert all(torch.equal(retrained[n], weights[1][n]) for n in retrained)


def test_a_last_pass_that_masks_nothing_is_iteration_0_again_and_the_summary_says_so(tmp_path, monkeypatch, capsys):
    """Iteration 1 masks a token per image, iteration 2 none: the final detector is iteration 0's. A user's run
    retrained it at full cost to the very same weights, and its summary reported iteration 1's mask signals only."""
    from scripts.iltm import ILTMWorkflow

    def passes(self, files, threshold, desc, *args):  # no maps: masks chosen per pass
        suspect = torch.zeros((len(files), *self.grid), dtype=torch.bool)
        suspect[:, 0, 0] = desc.startswith("ILTM 1")
        return suspect, torch.zeros_like(suspect)

    monkeypatch.setattr(ILTMWorkflow, "_sharded_pass", passes)
    out = _pipeline(tmp_path, "last", **{"iltm#min_iterations": 2})
    state = json.loads((out / "state.json").read_text())
    assert [state[f"masks_{k:02d}"]["masked_tokens"] for k in (1, 2)] == [12, 0]
    assert "same_masks_as" not in state["transformer_01"] and state["transformer_02"]["same_masks_as"] == 0
    assert state["checks_02"]["masks"]["final_same_as"] == 0
    summary = (out / "iltm" / "summary.md").read_text()
    assert "ILTM ended where it started: the final iteration's masks are iteration 0's" in summary
    assert "retraining without the first masks (iteration 1) lowered" in summary
    # another run exporting to the same file replaces it, and says so (its own model.pt keeps it)
    capsys.readouterr()
    _pipeline(tmp_path, "other", **{"iltm#min_iterations": 2, "iltm#export": str(out / "exported.pt"), "seed": 1})
    assert f"iltm#export: {out / 'exported.pt'} held another detector (an earlier export)" in capsys.readouterr().out


def test_small_cpu_preset_for_user_data(load_preset):
    """128 px images -> 16 x 16 tokens of 8 x 8 pixels; a 256-code book; mask passes at the inference's R."""
    parser, preset = load_preset("small.yaml")
    assert parser.get_parsed_content("latent_shape") == (16, 16)
    assert parser.get_parsed_content("transformer_def").max_seq_len == 256
    assert parser.get_parsed_content("vqvae_def").num_embeddings == 256
    assert parser.get_parsed_content("density_threshold") == pytest.approx(1.275)  # 8-bit data, MVTec's units
    assert parser.get_parsed_content("iltm#mask_num_samples") == preset["iltm#mask_num_samples"] == 16
