"""The "Can ILTM help here?" checks: each warning fires on the evidence it names, and only then."""

from __future__ import annotations

import pytest

from scripts import iltm_checks

HEALTHY = {
    "first_stage": {"val_l1": 0.02, "val_l1_anomaly": 0.04, "val_l1_normal": 0.02, "l1_ratio": 2.0,
                    "val_codes_used": 120, "codebook_size": 128},
    "map_source": {"aupro_full": 0.55, "aupro_ablation": 0.40, "aupro_gap": 0.15},
    "restriction": {"restricted": False, "images": 20, "unflagged_images": 2, "aupro_other": 0.50},
    "iteration_0": {"flag_lift": 4.0, "mask_lift": 5.0, "mask_recall": 0.45},
    "flags": {"resampled_share": 0.04, "masked_share": 0.08},
    "masks": {"unlearning": 0.25, "unlearning_per_iteration": [0.25, 0.1], "kept_drop": 0.02, "mask_growth": 0.1},
    "outcome": {"aupro_iteration_0": 0.55, "aupro_final": 0.60, "image_auroc_iteration_0": 0.70,
                "image_auroc_final": 0.75, "normal_images": 4, "anomalous_images": 16, "images_better": 10,
                "images_worse": 5},
}  # fmt: skip


def _with(section: str, **values) -> dict:
    return {**HEALTHY, section: {**HEALTHY[section], **values}}


def test_healthy_run_gets_no_warning_and_a_readable_section() -> None:
    assert iltm_checks.warnings(HEALTHY) == []
    text = iltm_checks.render(HEALTHY)
    assert text.startswith("## Can ILTM help here?") and "No warning" in text
    assert "0.0400 inside labelled anomalies" in text and "+0.150" in text and "by 0.25 nats more" in text
    assert "(no labels needed): 4.0% of the tokens flagged for resampling, 8.0% in the first masks" in text
    split = "(image by image, the final iteration higher on 10, lower on 5: within chance, sign test p = 0.302); image"
    assert f"0.600 at the final iteration {split}" in text  # binomial: P(<= 5 or >= 10 of 15) = 0.30
    assert "No warning: nothing here says ILTM cannot help, nor that it helped: the labelled images' split is" in text
    one_sided = iltm_checks.render(_with("outcome", images_better=14, images_worse=1))
    assert "higher on 14, lower on 1: beyond chance, sign test p = 0.000977)" in one_sided  # 2 x 16 / 2^15
    assert "No warning: nothing here says ILTM cannot help.\n" in one_sided + "\n"
    most_fell = iltm_checks.render(_with("outcome", images_better=1, images_worse=14))  # set-level within WORSE
    assert "cannot help, though more labelled images fell than rose, beyond chance." in most_fell
    unchanged = iltm_checks.render(_with("outcome", images_better=0, images_worse=0))
    assert "0.600 at the final iteration (no image's own AUPRO changed); image" in unchanged
    before_0_7_3 = {**HEALTHY, "outcome": {k: v for k, v in HEALTHY["outcome"].items() if not k.startswith("images_")}}
    assert "0.600 at the final iteration; image AUROC" in iltm_checks.render(before_0_7_3)  # no per-image counts
    no_normal = _with("outcome", image_auroc_iteration_0=None, image_auroc_final=None, normal_images=0)
    assert iltm_checks.warnings(no_normal) == [] and "image AUROC" not in iltm_checks.render(no_normal)
    # one normal and three anomalous validation images: one pair ranked the other way (1/3) is no evidence, more is
    few = {"image_auroc_iteration_0": 1.0, "normal_images": 1, "anomalous_images": 3}
    assert iltm_checks.warnings(_with("outcome", **few, image_auroc_final=2 / 3)) == []
    assert len(iltm_checks.warnings(_with("outcome", **few, image_auroc_final=1 / 3))) == 1


@pytest.mark.parametrize(
    "checks, phrase",
    [
        (_with("first_stage", l1_ratio=45.0), "first stage does not reproduce the anomalies"),
        (_with("first_stage", val_codes_used=3), "codebook has collapsed"),
        (_with("map_source", aupro_gap=0.0, aupro_ablation=0.55), "Transformer adds nothing"),
        (_with("iteration_0", flag_lift=1.2), "too weak for its masks"),
        (_with("masks", unlearning=0.02), "do not look like anomalies"),
        (_with("masks", kept_drop=0.3), "hurts the modelling of normal tokens"),
        (_with("outcome", aupro_final=0.50), "AUPRO 0.500 at the final iteration vs 0.550 at iteration 0 (image by "
                                             "image, the final iteration higher on 10, lower on 5: within chance, "
                                             "sign test p = 0.302)"),
        (_with("outcome", image_auroc_final=0.60), "image AUROC 0.600 at the final iteration vs 0.700 at iteration 0 "
                                                   "(4 normal and 16 anomalous images)"),
        ({**HEALTHY, "map_source": {"overlap": 0.95, "marked_voxels": 100}}, "marked without any resampling"),
        (_with("restriction", unflagged_images=20), "flagged no token on 20 of 20 validation images"),
        (_with("restriction", aupro_other=0.70), "AUPRO 0.700 vs 0.550 (iteration 0)"),
        (_with("iteration_0", mask_recall=0.038), "The first masks hold only 3.8% of the labelled anomalous"),
        # a new user's 3D pass: every token flagged, and without labels "No warning"
        ({**{k: v for k, v in HEALTHY.items() if k not in ("iteration_0", "outcome")},
          "flags": {"resampled_share": 1.0, "masked_share": 0.3}}, "it flags 100% of the training tokens for "
                                                                   "resampling and its first masks hold 30% (above 50%)"),
        # a user's pass: the first masks held 40 %, the final ones 54 %, and nothing said so
        (_with("flags", final_masked_share=0.54), "The final iteration's masks hold 54% of the training tokens"),
        (_with("masks", final_same_as=0), "ILTM ended where it started: the final iteration's masks are iteration 0's"),
        # a user's undertrained run segmented 4,095 of every 4,096 pixels, and nothing said so
        ({**HEALTHY, "segmentation": {"share_iteration_0": 0.99}}, "Iteration 0's segmentation marks 99% of the valid"),
    ],
)  # fmt: skip
def test_each_warning_fires_on_its_evidence(checks: dict, phrase: str) -> None:
    found = iltm_checks.warnings(checks)
    assert len(found) == 1 and phrase in found[0]
    assert phrase in iltm_checks.render(checks)


def test_missing_evidence_is_not_a_warning() -> None:
    """Without labels there is no fidelity ratio, no lift and no outcome: nothing is claimed about them."""
    checks = {"first_stage": {"val_l1": 0.02, "val_codes_used": 100, "codebook_size": 128},
              "map_source": {"overlap": None, "marked_voxels": 0}}  # fmt: skip
    assert iltm_checks.warnings(checks) == []
    assert "no labelled anomalies" in iltm_checks.render(checks)
    assert "Outcome" not in iltm_checks.render(checks)  # nothing masked: there is no ILTM effect to measure
    masked = {**checks, "masks": HEALTHY["masks"]}  # ILTM retrained, but no labelled validation image says how well
    assert iltm_checks.warnings(masked) == []
    assert "- Outcome: not measured" in iltm_checks.render(masked)
    assert iltm_checks.render(masked).count("labels are used only when every entry has one") == 2  # why none shows
    all_normal = {**masked, "first_stage": {**checks["first_stage"], "val_l1_normal": 0.02}}  # labelled, none anomalous
    assert "used only when every entry" not in iltm_checks.render(all_normal)
    assert "- Outcome: not measured" in iltm_checks.render(all_normal)
    assert "Outcome: not measured" not in iltm_checks.render(HEALTHY)
    nothing_masked = {**checks, "masks": {"masked_tokens": [0, 0]}}  # its own warning: ILTM changed nothing
    assert "Outcome" not in iltm_checks.render(nothing_masked)
    unvalidated = {"first_stage": iltm_checks.first_stage({"weights": "vqvae/vqvae.pt"}, 128)}  # no val metrics
    assert iltm_checks.warnings(unvalidated) == []
    assert "- First stage: not measured" in iltm_checks.render(unvalidated)


def test_lift_and_unlearning() -> None:
    assert iltm_checks.lift(0.2, 0.04) == pytest.approx(5.0)
    assert iltm_checks.lift(float("nan"), 0.04) is None and iltm_checks.lift(0.2, 0.0) is None
    before, after = {"masked": -3.0, "kept": -2.0}, {"masked": -3.5, "kept": -2.1}
    assert iltm_checks.unlearning(before, after) == pytest.approx(0.4)


def test_fidelity_is_judged_against_equally_bright_normal_tissue_where_recorded() -> None:
    """PET-like data: bright lesions err 7x more than the mostly dark rest, but no more than bright normal tissue;
    that is a faithful first stage. Lesions erring 4x more than bright normal tissue are not."""
    step = {"val_l1": 0.005, "val_l1_anomaly": 0.034, "val_l1_normal": 0.005, "val_l1_matched": 0.035}
    stage = iltm_checks.first_stage(step, 128)
    assert stage["l1_ratio"] == pytest.approx(6.8) and stage["l1_ratio_matched"] == pytest.approx(0.034 / 0.035)
    checks = {**HEALTHY, "first_stage": {**stage, "val_codes_used": 128}}
    assert iltm_checks.warnings(checks) == []
    assert "0.0350 on normal voxels of the same intensities (1.0x)" in iltm_checks.render(checks)
    unfaithful = {**HEALTHY, "first_stage": {**iltm_checks.first_stage({**step, "val_l1_matched": 0.0085}, 128)}}
    (warning,) = iltm_checks.warnings(unfaithful)
    assert "4.0x its error on normal voxels of the same intensities" in warning


def test_masks_that_hold_nothing_are_said_plainly() -> None:
    """No training token masked in any pass: one warning that ILTM cannot change anything, not a NaN unlearning or a
    -100 % growth; no validation token masked: the unlearning is not measured, nor warned about."""
    empty = _with("masks", unlearning=None, unlearning_per_iteration=[None, None], mask_growth=None,
                  masked_tokens=[0, 0])  # fmt: skip
    (warning,) = iltm_checks.warnings(empty)
    assert "masked no training token in any pass" in warning
    text = iltm_checks.render(empty)
    assert "- Masks: no training token was masked in any pass" in text and "nan" not in text.lower()
    unmeasured = _with("masks", unlearning=None, masked_tokens=[10, 11])
    assert iltm_checks.warnings(unmeasured) == []
    assert "no validation token was masked in the first pass" in iltm_checks.render(unmeasured)
    assert "+10% from the first pass" in iltm_checks.render(unmeasured)
    late = _with("masks", unlearning=None, mask_growth=None, masked_tokens=[0, 5])
    assert iltm_checks.warnings(late) == []
    assert "masked training tokens none in the first pass" in iltm_checks.render(late)


def test_masks_of_ordinary_tokens_without_a_labelled_outcome_point_to_iteration_0() -> None:
    """On clean data ILTM masks ordinary tokens and can lose accuracy; with no labelled validation image to measure
    that, the unlearning warning names the risk and iteration 0's detector; with one, the outcome line speaks."""
    unlabelled = {
        **{k: v for k, v in HEALTHY.items() if k != "outcome"},
        "masks": {**HEALTHY["masks"], "unlearning": 0.02},
    }
    (warning,) = iltm_checks.warnings(unlabelled)
    assert "do not look like anomalies" in warning and "can make the detector worse" in warning
    assert "iltm/iter_00/model.pt" in warning
    (labelled,) = iltm_checks.warnings(_with("masks", unlearning=0.02))
    assert labelled.endswith("ILTM is unlikely to help here.") and "iter_00" not in labelled


def test_a_fall_in_aupro_is_called_worse_only_beyond_chance() -> None:
    """A user's run warned "ILTM made the detector worse" on one anomalous validation image, with p = 1 beside it."""
    one = _with("outcome", aupro_final=0.50, images_better=0, images_worse=1, normal_images=1, anomalous_images=1)
    (warning,) = [w for w in iltm_checks.warnings(one) if "AUPRO 0.500" in w]
    assert warning.startswith("AUPRO fell, though not beyond chance, on the labelled validation images: AUPRO 0.500")
    assert "sign test p = 1)" in warning and warning.endswith("compare the two on more labelled images.")
    assert "(1 normal and 1 anomalous image)" in iltm_checks.render(one)
    many = _with("outcome", aupro_final=0.50, images_better=1, images_worse=14)
    (warning,) = [w for w in iltm_checks.warnings(many) if "AUPRO 0.500" in w]
    assert warning.startswith("ILTM made the detector worse on the labelled validation images: AUPRO 0.500")
    assert "beyond chance, sign test p = 0.000977)" in warning and warning.endswith("iltm/iter_00/model.pt.")
    for rose, fell, says in ((14, 1, "AUPRO fell on"), (0, 0, "AUPRO fell on")):  # most images rose, or none moved
        (warning,) = [w for w in iltm_checks.warnings(_with("outcome", aupro_final=0.5, images_better=rose,
                                                               images_worse=fell)) if "AUPRO 0.500" in w]  # fmt: skip
        assert warning.startswith(says) and "worse" not in warning
    old = {**HEALTHY, "outcome": {k: v for k, v in HEALTHY["outcome"].items() if not k.startswith("images_")}}
    old["outcome"]["aupro_final"] = 0.5  # recorded before 0.7.3: no split to weigh the fall against
    assert any(w.startswith("ILTM made the detector worse") for w in iltm_checks.warnings(old))


def test_a_record_from_before_0_6_3_with_nan_unlearning_reads_as_not_measured() -> None:
    old = _with("masks", unlearning=float("nan"), unlearning_per_iteration=[float("nan")])
    assert iltm_checks.warnings(old) == []
    assert "not measured" in iltm_checks.render(old) and "nan" not in iltm_checks.render(old)


def test_nothing_flagged_or_masked_at_iteration_0_is_said_not_formatted() -> None:
    """A lift is None where iteration 0 flagged or masked no training token: the section says so (it crashed)."""
    for lifts, says in (
        ({"flag_lift": 3.0, "mask_lift": None}, "flags 3.00x as likely as chance to hit a labelled anomalous token; "
                                                "no token in the first masks"),
        ({"flag_lift": None, "mask_lift": None}, "no token flagged; no token in the first masks"),
        ({"flag_lift": 0.0, "mask_lift": 2.0}, "flags 0.00x and first masks 2.00x as likely as chance"),
    ):  # fmt: skip
        assert f"- Iteration 0 on the training images: {says}" in iltm_checks.render({"iteration_0": lifts})


def test_a_negative_unlearning_and_a_lift_just_below_the_bar_read_without_contradiction() -> None:
    """A user's real-data run showed "by -0.05 nats more than the kept tokens'" and "2.0x ... (below 2x)"."""
    raised = _with("masks", unlearning=-0.052)
    assert "by 0.05 nats less than the kept tokens'" in iltm_checks.render(raised)
    assert "by 0.05 nats less than the kept tokens'" in " ".join(iltm_checks.warnings(raised))
    assert "-0.05" not in iltm_checks.render(raised)
    assert "by only 0.02 nats more" in iltm_checks.warnings(_with("masks", unlearning=0.02))[0]
    assert "1.98x as often as chance (below 2x)" in iltm_checks.warnings(_with("iteration_0", flag_lift=1.978))[0]


def test_the_other_map_setting_is_named_where_it_scores_higher() -> None:
    """MVTec screw (small preset, 0.6.11's default restricted maps): AUPRO 0.000 restricted, 0.602 unrestricted on the
    validation images; the summary names the better setting either way. A Transformer that flags nothing adds nothing
    to the map, restricted or not. Runs of 0.6.11 recorded the unrestricted AUPRO of restricted maps only."""
    text = iltm_checks.render(HEALTHY)
    assert "- Map restriction (iteration 0, validation): maps not restricted to flagged tokens (restrict_to_flags " \
           "False); no flagged token on 2 of 20 images; AUPRO 0.500 restricted to flagged tokens" in text  # fmt: skip
    assert "the first masks hold 45.0% of them" in text
    screw = {**HEALTHY, "map_source": {"aupro_full": 0.0, "aupro_ablation": 0.609, "aupro_gap": -0.609},
             "restriction": {"restricted": True, "images": 5, "unflagged_images": 0, "aupro_other": 0.602}}  # fmt: skip
    found = [w for w in iltm_checks.warnings(screw) if "restrict_to_flags" in w]
    assert found == ["The map not restricted to flagged tokens scores higher on the labelled validation images than "
                     "this run's (restricted to flagged tokens): AUPRO 0.602 vs 0.000 (iteration 0). Evaluate and "
                     "infer with --restrict_to_flags False."]  # fmt: skip
    better_restricted = _with("restriction", aupro_other=0.70)  # the default unrestricted map trails
    assert "--restrict_to_flags True." in iltm_checks.warnings(better_restricted)[0]
    flat = _with("restriction", unflagged_images=20)
    (found,) = iltm_checks.warnings(flat)
    assert "healing changes nothing there" in found and "20 of 20" in found
    old = {"restriction": {"restricted": True, "images": 10, "unflagged_images": 0, "aupro_unrestricted": 0.7},
           "map_source": {"aupro_full": 0.5}}  # fmt: skip
    assert "AUPRO 0.700 vs 0.500" in iltm_checks.warnings(old)[0] and "0.700 not restricted" in iltm_checks.render(old)
    unlabelled = {"restriction": {"restricted": False, "images": 10, "unflagged_images": 6}}
    (only,) = iltm_checks.warnings(unlabelled)
    assert "6 of 10" in only and "AUPRO" not in iltm_checks.render(unlabelled)


def test_a_collapsed_codebook_names_the_band_of_narrow_intensities() -> None:
    """CrackForest: patches of 91-189 on 0-255 collapsed the codebook; the warning gives the band to set, and does not
    blame the band where the images fill the range."""
    collapsed = {"val_codes_used": 25, "codebook_size": 256, "intensity_range": [0.0, 255.0]}
    (narrow,) = iltm_checks.warnings({"first_stage": {**collapsed, "intensity_band": [68.6, 207.2]}})
    assert "fill 68.6-207.2 (0.1-99.9 percentiles) of 0-255" in narrow
    assert "--intensity_min 68 --intensity_max 208" in narrow
    (wide,) = iltm_checks.warnings({"first_stage": {**collapsed, "intensity_band": [3.0, 250.0]}})
    assert "not the cause" in wide and "--intensity_min" not in wide
    assert not iltm_checks.collapsed({"val_codes_used": 100, "codebook_size": 256})
    unit = {**collapsed, "intensity_range": [0.0, 1.0], "intensity_band": [0.2137, 0.6021]}  # float images on 0-1
    assert "--intensity_min 0.21 --intensity_max 0.61" in iltm_checks.warnings({"first_stage": unit})[0]
    # SUV on the autoPET preset's 0-15: hot lesions are the brightest voxels; the band's top would clip them
    pet = {**collapsed, "intensity_range": [0.0, 15.0], "intensity_band": [0.02, 8.2041, 13.7]}
    (hot,) = iltm_checks.warnings({"first_stage": pet})
    assert "fill 0.02-8.204 (0.1-99.9 percentiles) of 0-15;" in hot and "--intensity_max 8.3." in hot
    assert "Intensities above 8.3 (the brightest 0.1 % of the sampled voxels, up to 13.7) would be clipped" in hot
    assert (
        "would be clipped" not in iltm_checks.warnings({"first_stage": {**pet, "intensity_band": [0.02, 8.2, 8.2]}})[0]
    )
