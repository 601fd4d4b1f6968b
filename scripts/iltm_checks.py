"""Can ILTM help on this data? The evidence every run reports, and the plain warnings it gives.

ILTM only retrains the Transformer (Patel et al. 2023, §3.2), so it can change a detector only where the anomaly map
comes from the Transformer's healing, and only if its first masks catch anomalies ("this approach relies on an
adequate anomaly detection performance in the first iteration"). Each check below reads numbers the run already
has; the thresholds are rules of thumb, stated here and in the model card, not guarantees:

- first stage: the VQ-VAE's validation L1 inside labelled anomalies vs on normal voxels of the same intensities
  (vs all voxels outside them for runs recorded before that). Above :data:`FIDELITY_RATIO` the reconstruction error
  alone marks the anomalies; a collapsed codebook cannot be faithful either.
- map source: the full detector against the ablation without resampling on the validation images. With labels,
  the AUPRO gap; without, the share of the full map's anomalous voxels that the ablation marks too.
- map restriction (``restrict_to_flags``): on an image without a flagged token healing changes nothing, so a
  Transformer that flags nothing adds nothing to the map; with labels, the other setting's AUPRO beside the run's.
- iteration 0: with training labels, how much more often than chance its flags and first masks hit anomalous tokens,
  and what share of them the first masks hold (masks of a few anomalous tokens leave the contamination in).
- the masks, unsupervised: when masks hold anomalies, the retrained Transformer "unlearns" them, so on held-out
  images its likelihood of masked tokens drops more than that of kept ones. Masks of ordinary tokens show no such
  drop (its other instances are still learned). Also: the kept tokens' likelihood must not fall, and masks grow as
  later passes find what earlier models had learned as normal.
- outcome: with validation labels, final iteration against iteration 0: AUPRO (and how many labelled images, each
  scored alone, rose or fell, and whether that split is beyond what chance gives by a sign test: on few images a
  set-level change can be noise), and image AUROC where the validation images are both normal and anomalous (ILTM
  can localise better yet rank whole images worse).
"""

from __future__ import annotations

import math

from scipy.stats import binomtest

from scripts.vqvae import fidelity_ratios

FIDELITY_RATIO = 3.0  # L1 inside labelled anomalies / intensity-matched normal L1 above which it explains the map
CODEBOOK_USE = 0.25  # share of codes used below which the codebook has collapsed
ABLATION_GAP = 0.01  # AUPRO the Transformer's healing must add over the ablation
FIRST_STAGE_OVERLAP = 0.8  # without labels: share of the map's anomalous voxels the ablation also marks
LIFT = 2.0  # flags / masks must hit anomalous tokens this many times more often than chance
UNLEARNING = 0.1  # nats: masked-token likelihood drop beyond the kept tokens' after retraining
KEPT_DROP = 0.1  # nats: fall of the kept validation tokens' likelihood from iteration 0 to the final one
# AUPRO on labelled validation images by which the final iteration may trail iteration 0; for image AUROC, this or
# one swapped pair of a normal and an anomalous image (1 / (normal x anomalous)), whichever is larger
WORSE = 0.01
BAND = 0.75  # share of intensity_min..max the training intensities fill below which they are a narrow band
UNFLAGGED = 0.5  # share of validation images without a flagged token above which the Transformer adds little
RECALL = 0.1  # share of the labelled anomalous training tokens the first masks must hold for ILTM to unlearn much
FLAGGED = 0.5  # share of the training tokens flagged or masked by iteration 0 above which it marks more than anomalies
SIGN_TEST = 0.05  # two-sided sign test over the images' own AUPRO changes: at or above, a split chance alone gives


def first_stage(step: dict, codebook_size: int) -> dict:
    """Fidelity of the VQ-VAE from its validation metrics (``state.json`` step ``vqvae``)."""
    keys = ("val_l1", "val_l1_anomaly", "val_l1_normal", "val_l1_matched", "val_codes_used", "val_perplexity")
    out = {k: step.get(k) for k in keys}
    out["codebook_size"] = codebook_size
    return {**out, **fidelity_ratios({k.removeprefix("val_"): v for k, v in out.items()})}


def collapsed(stage: dict) -> bool:
    """Fewer than :data:`CODEBOOK_USE` of the codes in use on the validation images."""
    used = stage.get("val_codes_used")
    return used is not None and used < CODEBOOK_USE * stage["codebook_size"]


def _band(stage: dict) -> str:
    """The remedy for images of a narrow intensity band, with the band where the run measured it."""
    if not stage.get("intensity_band"):
        return (
            "Images whose intensities fill a narrow band are one cause: set --intensity_min and --intensity_max to it."
        )
    (low, high, *top), (start, end) = stage["intensity_band"], stage["intensity_range"]  # top: since 0.7.6
    if high - low >= BAND * (end - start):
        return "The training images use most of intensity_min..intensity_max, so their intensity band is not the cause."
    step = 10 ** math.floor(math.log10(end - start)) / 100  # rounded outward, to 1 on 0-255 and 0.01 on 0-1
    upper = round(math.ceil(high / step) * step, 6)
    clipped = (
        f" Intensities above {upper:g} (the brightest 0.1 % of the sampled voxels, up to {top[0]:.4g}) would be "
        "clipped to it: where anomalies are brighter than normal tissue (hot lesions), keep --intensity_max above "
        "them, or keep the preset's scale."
        if top and top[0] > upper + 0.1 * (upper - low)  # a tail, not the maximum just above the 99.9th percentile
        else ""
    )
    return (
        f"The training images' intensities fill {low:.4g}-{high:.4g} (0.1-99.9 percentiles) of {start:g}-{end:g}; "
        f"mapping that band to [0, 1] can mend it: in a new --output_dir, --intensity_min "
        f"{round(math.floor(low / step) * step, 6):g} --intensity_max {upper:g}.{clipped}"
    )


def lift(precision: float | None, base_rate: float | None) -> float | None:
    """How many times more often than chance a set of tokens hits anomalous ones."""
    if precision is None or not base_rate or math.isnan(precision):
        return None
    return precision / base_rate


def unlearning(before: dict, after: dict) -> float:
    """Drop of the masked tokens' mean log-likelihood beyond the kept tokens' drop, from one model to the next."""
    return (before["masked"] - after["masked"]) - (before["kept"] - after["kept"])


def _than_kept(unlearned: float, only: str = "") -> str:
    """How far the masked tokens' log-likelihood fell beyond the kept tokens', without a negative "more"."""
    if unlearned >= 0:
        return f"by {only}{unlearned:.2f} nats more than the kept tokens'"
    return f"by {-unlearned:.2f} nats less than the kept tokens'"


def warnings(checks: dict) -> list[str]:
    """Plain sentences for everything in ``checks`` that says ILTM may not help, or did not."""
    out = []
    stage = checks.get("first_stage", {})
    ratio, against = stage.get("l1_ratio_matched"), "on normal voxels of the same intensities"
    if ratio is None:  # recorded before 0.6.0, or no intensity bin had enough normal voxels to compare with
        ratio, against = stage.get("l1_ratio"), "elsewhere"
    if ratio is not None and ratio > FIDELITY_RATIO:
        out.append(
            f"The first stage does not reproduce the anomalies: the VQ-VAE's error inside labelled anomalies is "
            f"{ratio:.1f}x its error {against} (above {FIDELITY_RATIO:.0f}x), so reconstruction error "
            "marks them whatever the Transformer learns, and ILTM, which only retrains the Transformer, has less to "
            "change. A wider VQ-VAE, more codes, less downsampling or longer training make it more faithful."
        )
    if collapsed(stage):
        out.append(
            f"The codebook has collapsed: {stage['val_codes_used']:.0f} of {stage['codebook_size']} codes in use, so "
            "few token sequences are possible, the Transformer finds them all likely and flags little. " + _band(stage)
        )
    source = checks.get("map_source", {})
    if source.get("aupro_gap") is not None and source["aupro_gap"] < ABLATION_GAP:
        out.append(
            f"The Transformer adds nothing over the reconstruction error on the labelled validation images: AUPRO "
            f"{source['aupro_full']:.3f} with healing vs {source['aupro_ablation']:.3f} without (iteration 0)."
        )
    if source.get("overlap") is not None and source["overlap"] > FIRST_STAGE_OVERLAP:
        out.append(
            f"The first stage alone explains the map: {source['overlap']:.0%} of the voxels the detector marks on the "
            "validation images are marked without any resampling too."
        )
    out += _restriction_warnings(checks.get("restriction", {}), source)
    start = checks.get("iteration_0", {})
    for name, what in (("flag_lift", "its resampling flags"), ("mask_lift", "the first token masks")):
        if start.get(name) is not None and start[name] < LIFT:
            out.append(
                f"Iteration 0 is too weak for its masks to mean much: {what} hit labelled anomalous training tokens "
                f"only {start[name]:.2f}x as often as chance (below {LIFT:.0f}x)."
            )
    shares = checks.get("flags", {})
    flagged, masked = (shares.get(k) for k in ("resampled_share", "masked_share"))
    if flagged is not None and max(flagged, masked) > FLAGGED:
        out.append(
            f"Iteration 0 marks most of each training image: it flags {flagged:.0%} of the training tokens for "
            f"resampling and its first masks hold {masked:.0%} (above {FLAGGED:.0%}). Anomalies are rarely that much "
            "of an image, so its maps mark more than anomalies and its masks take mostly normal tokens out of "
            "training. An undertrained Transformer (more transformer#epochs) or a mask resampling threshold "
            "(iltm#mask_resample_threshold, by default resample_threshold) near the chance probability of a code "
            "(1 / codebook size) causes it."
        )
    segmented = checks.get("segmentation", {}).get("share_iteration_0")
    if segmented is not None and segmented > FLAGGED:
        out.append(
            f"Iteration 0's segmentation marks {segmented:.0%} of the validation voxels (above {FLAGGED:.0%}): the "
            "density threshold is far from where this model's densities lie (an undertrained model, or intensities "
            "on another scale), so its segmentations, and the token masks made the same way, mark more than "
            "anomalies. Its maps may still rank voxels well (AUPRO)."
        )
    final_share = shares.get("final_masked_share")
    if final_share is not None and final_share > FLAGGED and not (masked is not None and masked > FLAGGED):
        out.append(
            f"The final iteration's masks hold {final_share:.0%} of the training tokens (above {FLAGGED:.0%}), so its "
            "Transformer learned from a minority of each image; anomalies are rarely that much of an image. Compare "
            "its detector with iteration 0's (iltm/iter_00/model.pt) before using it."
        )
    recall = start.get("mask_recall")
    if _number(recall) and 0 < recall < RECALL:  # none masked at all has its own warning below
        out.append(
            f"The first masks hold only {recall:.1%} of the labelled anomalous training tokens (recall below "
            f"{RECALL}): retraining without them leaves most of the contamination in, so ILTM can unlearn only the few "
            "anomalies they catch."
        )
    masks, outcome = checks.get("masks", {}), checks.get("outcome", {})
    if _nothing_masked(masks):
        out.append(
            "ILTM masked no training token in any pass, so a retraining would see what iteration 0 saw and ILTM "
            "cannot change the detector here: no map of a training image fell below the mask density threshold. The "
            "paper's remedy for a weak first iteration is a higher resampling threshold for the masks "
            "(iltm#mask_resample_threshold, in a new --output_dir); where the warnings above fault the first stage, "
            "mend that first."
        )
    elif masks.get("final_same_as") == 0:
        out.append(
            "ILTM ended where it started: the final iteration's masks are iteration 0's, so its detector is iteration "
            "0's (the Transformer was copied, not retrained), whatever the earlier iterations masked. The section's "
            "mask signals describe those earlier iterations, not the final detector."
        )
    elif _number(masks.get("unlearning")) and masks["unlearning"] < UNLEARNING:
        out.append(
            f"The masks do not look like anomalies: retrained without them, the Transformer lowered the masked "
            f"validation tokens' log-likelihood {_than_kept(masks['unlearning'], 'only ')} "
            f"(below {UNLEARNING}), as it does for masks of ordinary tokens. ILTM is unlikely to help here"
            + _unmeasured_risk(outcome)
        )
    if masks.get("kept_drop") is not None and masks["kept_drop"] > KEPT_DROP:
        out.append(
            f"ILTM hurts the modelling of normal tokens: the kept validation tokens' log-likelihood fell by "
            f"{masks['kept_drop']:.2f} nats from iteration 0 to the final iteration."
        )
    if outcome.get("aupro_final") is not None and outcome["aupro_final"] < outcome["aupro_iteration_0"] - WORSE:
        p, better, worse = _sign_test(outcome), outcome.get("images_better"), outcome.get("images_worse")
        if better is None or p is not None and p < SIGN_TEST and worse > better:  # no split recorded, or most fell
            head, tail = "ILTM made the detector worse", "."
        else:  # a fall the images, each scored alone, do not bear out
            head = "AUPRO fell, though not beyond chance," if p is not None and p >= SIGN_TEST else "AUPRO fell"
            tail = "; compare the two on more labelled images."
        out.append(
            f"{head} on the labelled validation images: AUPRO {outcome['aupro_final']:.3f} at the final iteration vs "
            f"{outcome['aupro_iteration_0']:.3f} at iteration 0{_per_image(outcome)}. Iteration 0's detector is "
            f"iltm/iter_00/model.pt{tail}"
        )
    drop = outcome["image_auroc_iteration_0"] - outcome["image_auroc_final"] if _image_aurocs(outcome) else 0.0
    if drop > max(WORSE, _auroc_step(outcome)) + 1e-9:
        out.append(
            f"ILTM ranked whole images worse on the labelled validation images: image AUROC "
            f"{outcome['image_auroc_final']:.3f} at the final iteration vs {outcome['image_auroc_iteration_0']:.3f} at "
            f"iteration 0 ({_images(outcome)}). Where image-level decisions matter, compare iltm/iter_00/model.pt."
        )
    return out


def _unmeasured_risk(outcome: dict) -> str:
    """Masks of ordinary tokens can also cost accuracy (clean data, docs/README.md); say so where no label shows it."""
    if outcome.get("aupro_final") is not None:
        return "."  # the labelled outcome below says whether it did
    return (
        ", and retraining without such masks can make the detector worse. No labelled validation image can show "
        "whether it did: compare the final model with iteration 0's detector (iltm/iter_00/model.pt) on labelled "
        "images before using it, or keep iteration 0's detector."
    )


def _restriction_warnings(restriction: dict, source: dict) -> list[str]:
    """Where nothing is flagged the Transformer adds nothing; with labels, the other map setting may score higher."""
    out = []
    unflagged, images = restriction.get("unflagged_images", 0), restriction.get("images", 0)
    if images and unflagged / images > UNFLAGGED:
        out.append(
            f"The Transformer flagged no token on {unflagged} of {images} validation images (iteration 0): it "
            "predicts their every token as likely, so healing changes nothing there and their maps are the "
            "reconstructions' alone."
        )
    restricted, other, own = restriction.get("restricted"), _other_aupro(restriction), source.get("aupro_full")
    if other is not None and own is not None and other > own + WORSE:
        out.append(
            f"The map {_setting(not restricted)} scores higher on the labelled validation images than this run's "
            f"({_setting(restricted)}): AUPRO {other:.3f} vs {own:.3f} (iteration 0). Evaluate and infer with "
            f"--restrict_to_flags {not restricted}."
        )
    return out


def _other_aupro(restriction: dict) -> float | None:
    """AUPRO of the map setting the run did not use (runs of 0.6.11 recorded it only when restricted)."""
    if "aupro_other" in restriction:
        return restriction["aupro_other"]
    return restriction.get("aupro_unrestricted") if restriction.get("restricted") else None


def _setting(restricted: bool) -> str:
    return "restricted to flagged tokens" if restricted else "not restricted to flagged tokens"


def render(checks: dict) -> str:
    """Markdown section for summary.md: the numbers, then the warnings (or that none applies)."""
    lines = ["## Can ILTM help here?", ""]
    stage = checks.get("first_stage", {})
    if stage.get("l1_ratio") is not None:
        lines.append(
            f"- First stage: validation L1 {stage['val_l1_anomaly']:.4f} inside labelled anomalies, "
            f"{stage['val_l1_normal']:.4f} outside ({stage['l1_ratio']:.1f}x)" + _matched(stage) + _codes(stage)
        )
    elif stage.get("val_l1") is not None:
        lines.append(
            f"- First stage: validation L1 {stage['val_l1']:.4f} (no labelled anomalies{_unlabelled(stage)})"
            + _codes(stage)
        )
    else:
        lines.append("- First stage: not measured (the VQ-VAE step recorded no validation metrics)")
    source = checks.get("map_source", {})
    if source.get("aupro_gap") is not None:
        lines.append(
            f"- Map source (iteration 0, validation): AUPRO {source['aupro_full']:.3f} with healing, "
            f"{source['aupro_ablation']:.3f} without resampling (gap {source['aupro_gap']:+.3f})"
        )
    if source.get("overlap") is not None:
        lines.append(
            f"- Map source (iteration 0, validation): {source['overlap']:.0%} of the marked voxels are marked "
            "without resampling too"
        )
    restriction = checks.get("restriction", {})
    if restriction.get("images"):
        restricted, other = bool(restriction.get("restricted")), _other_aupro(restriction)
        lines.append(
            f"- Map restriction (iteration 0, validation): maps {_setting(restricted)} (restrict_to_flags "
            f"{restricted}); no flagged token on {restriction['unflagged_images']} of {restriction['images']} images"
            + (f"; AUPRO {other:.3f} {_setting(not restricted)}" if other is not None else "")
        )
    start = checks.get("iteration_0")
    if start:  # there are labelled anomalous training tokens; a lift is None where nothing was flagged or masked
        flags, masks = (start.get(k) for k in ("flag_lift", "mask_lift"))
        odds = "as likely as chance to hit a labelled anomalous token"
        if flags is not None and masks is not None:
            recall = start.get("mask_recall")
            lines.append(
                f"- Iteration 0 on the training images: flags {flags:.2f}x and first masks {masks:.2f}x {odds}"
                + (f"; the first masks hold {recall:.1%} of them" if _number(recall) else "")
            )
        else:
            flagged = "no token flagged" if flags is None else f"flags {flags:.2f}x {odds}"
            masked = "no token in the first masks" if masks is None else f"first masks {masks:.2f}x as likely"
            lines.append(f"- Iteration 0 on the training images: {flagged}; {masked}")
    shares = checks.get("flags")
    if shares:  # recorded since 0.7.6
        lines.append(
            f"- Iteration 0 on the training images (no labels needed): {shares['resampled_share']:.1%} of the tokens "
            f"flagged for resampling, {shares['masked_share']:.1%} in the first masks"
        )
    masks = checks.get("masks", {})
    if _nothing_masked(masks):
        lines.append("- Masks: no training token was masked in any pass")
    elif masks.get("kept_drop") is not None:
        unlearned = (
            f"retraining without the first masks (iteration 1) lowered their log-likelihood "
            f"{_than_kept(masks['unlearning'])}"
            if _number(masks.get("unlearning"))
            else "no validation token was masked in the first pass, so whether the retrained Transformer unlearns "
            "masked tokens is not measured"
        )
        growth = masks.get("mask_growth")
        lines.append(
            f"- Masks (unsupervised, validation): {unlearned}; kept tokens {-masks['kept_drop']:+.2f} nats from "
            "iteration 0 to the final one; masked training tokens "
            + (f"{growth:+.0%} from the first pass to the last" if growth is not None else "none in the first pass")
        )
    outcome = checks.get("outcome", {})
    if outcome.get("aupro_final") is not None:
        lines.append(
            f"- Outcome (labelled validation images): AUPRO {outcome['aupro_iteration_0']:.3f} at iteration 0, "
            f"{outcome['aupro_final']:.3f} at the final iteration{_per_image(outcome)}"
            + (
                f"; image AUROC {outcome['image_auroc_iteration_0']:.3f} at iteration 0, "
                f"{outcome['image_auroc_final']:.3f} at the final iteration ({_images(outcome)})"
                if _image_aurocs(outcome)
                else ""
            )
        )
    elif masks and not _nothing_masked(masks):  # ILTM masked: unmeasured, lest "no warning" read as a gain
        lines.append(
            "- Outcome: not measured (no validation image has both labelled anomalous and normal voxels"
            f"{_unlabelled(stage)}), so nothing here says whether ILTM improved on iteration 0; to compare, evaluate "
            "iltm/iter_00/model.pt and the final model.pt on labelled images"
        )
    found = warnings(checks)
    lines += (
        ["", *(f"- **Warning.** {w}" for w in found)]
        if found
        else ["", f"No warning: nothing here says ILTM cannot help{_unproven(outcome)}."]
    )
    return "\n".join(lines)


def _nothing_masked(masks: dict) -> bool:
    """Every mask pass recorded, and none masked a training token."""
    return bool(masks.get("masked_tokens")) and not any(masks["masked_tokens"])


def _number(value: float | None) -> bool:
    """A measured value: runs recorded before 0.6.3 stored NaN where nothing was measured."""
    return value is not None and not math.isnan(value)


def _per_image(outcome: dict) -> str:
    """Images whose own AUPRO rose and fell: on few validation images a set-level change can be one image's."""
    if outcome.get("images_better") is None:  # recorded before 0.7.3
        return ""
    split = (
        f"image by image, the final iteration higher on {outcome['images_better']}, lower on {outcome['images_worse']}"
    )
    p = _sign_test(outcome)
    if p is None:  # neither rose nor fell
        return " (no image's own AUPRO changed)"
    return f" ({split}: {'within' if p >= SIGN_TEST else 'beyond'} chance, sign test p = {p:.3g})"


def _sign_test(outcome: dict) -> float | None:
    """Were ILTM to change nothing, each image would be as likely to rise as to fall: how often chance splits so."""
    better = outcome.get("images_better")
    return None if better is None else sign_test(better, outcome["images_worse"])


def sign_test(higher: int, lower: int) -> float | None:
    """Two-sided sign test of images that rose against images that fell (None: none moved)."""
    return binomtest(higher, higher + lower).pvalue if higher + lower else None


def _unproven(outcome: dict) -> str:
    """Without a warning, a labelled outcome within chance must not read as a gain, nor one that most images lost."""
    p = _sign_test(outcome)
    if p is None:
        return ""
    if p >= SIGN_TEST:
        return ", nor that it helped: the labelled images' split is within chance"
    worse = outcome["images_worse"] > outcome["images_better"]
    return ", though more labelled images fell than rose, beyond chance" if worse else ""


def _unlabelled(stage: dict) -> str:
    """Why no validation label shows, where none reached the run (the VQ-VAE measured no labelled voxel at all): a
    partly labelled section's labels are dropped (scripts.data.load_datalist)."""
    if stage.get("val_l1_normal") is not None:
        return ""
    return "; a datalist section's labels are used only when every entry has one"


def _image_aurocs(outcome: dict) -> bool:
    return _number(outcome.get("image_auroc_iteration_0")) and _number(outcome.get("image_auroc_final"))


def _auroc_step(outcome: dict) -> float:
    """One pair of a normal and an anomalous image ranked the other way: a smaller change is one image's noise."""
    pairs = (outcome.get("normal_images") or 0) * (outcome.get("anomalous_images") or 0)
    return 1.0 / pairs if pairs else 0.0


def _images(outcome: dict) -> str:
    """How many validation images an image AUROC rests on: with few normal ones it moves in large steps."""
    anomalous = outcome.get("anomalous_images")
    return f"{outcome.get('normal_images')} normal and {anomalous} anomalous image{'' if anomalous == 1 else 's'}"


def _matched(stage: dict) -> str:
    if stage.get("l1_ratio_matched") is None:
        return ""
    return (
        f", {stage['val_l1_matched']:.4f} on normal voxels of the same intensities ({stage['l1_ratio_matched']:.1f}x)"
    )


def _codes(stage: dict) -> str:
    if stage.get("val_codes_used") is None:
        return ""
    return f"; {stage['val_codes_used']:.0f} of {stage['codebook_size']} codes used"
