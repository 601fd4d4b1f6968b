"""Is the Transformer, not the VQ-VAE's reconstruction error, finding the anomalies?

See docs/README.md, "What makes ILTM work".

For one trained detector and one labelled datalist section it prints:
1. pixel metrics of the full method against the ablation without resampling (original latent, dropout decoding
   only): when the two agree, the map is the VQ-VAE's reconstruction error and ILTM cannot help;
2. precision and recall, against the true anomalous tokens, of the Transformer's resampling flags and of the token
   masks each downsampling rule would give (the evidence behind `iltm#downsample_rule`; from the map the training's
   mask passes use, restricted to flags unless `--mask_restrict_to_flags False`, at `iltm#mask_density_threshold`,
   but with inference's N, M and resampling threshold, so a run's `masks_01` matches only where those match too),
   and the token AUROC: how
   well the Transformer's token log-likelihoods rank the anomalous tokens above the normal ones, whatever the
   resampling threshold (0.5: chance), and the same with the labelled anomalous tokens left out of every token's
   context (``token_auroc_anomalies_out_of_context``): the gap is how much an anomaly's first tokens make the rest
   of it look likely to an autoregressive model;
3. the first stage's fidelity: the VQ-VAE's L1 inside the anomalies, outside them, and on normal voxels of the same
   intensities (`scripts.vqvae.fidelity`), as training's validation reports it.

python -m scripts.diagnose --config_file "['configs/train.yaml','configs/demo.yaml']" \
    --checkpoint runs/demo/iltm/iter_00/model.pt [--section training] [--json_path out.json]
"""

from __future__ import annotations

import json

import torch
from monai.bundle import ConfigParser
from tqdm import tqdm

from scripts.checkpoint import load_detector
from scripts.cli import check_ids, fire_main
from scripts.data import DataError, load_datalist
from scripts.detector import AnomalyDetector, segment
from scripts.files import write_json
from scripts.healing import token_log_likelihood
from scripts.iltm import precision_recall, tokens_from_map
from scripts.metrics import image_auroc, pixel_auroc, pixel_metrics
from scripts.vqvae import error_tally, eval_except, fidelity, fidelity_ratios

RULES = (("any", 0.0), ("fraction", 0.25), ("fraction", 0.5))
SETTINGS = ("num_samples", "num_decodes", "resample_threshold", "density_threshold", "restrict_to_flags",
            "flag_neighbourhood")  # fmt: skip


def _maps(detector, items: list[dict], resample: bool, batch_size: int) -> dict[str, torch.Tensor]:
    outs = []
    for start in tqdm(range(0, len(items), batch_size), desc=f"maps (resample={resample})", leave=False):
        image = torch.stack([item["image"] for item in items[start : start + batch_size]])
        outs.append(detector.infer(image.to(next(detector.parameters()).device), resample=resample))
    keys = ("score", "restricted_score", "unrestricted_score", "latent_flags", "latent_log_likelihood")
    return {k: torch.cat([o[k].cpu() for o in outs]) for k in keys}


@torch.no_grad()
def _first_stage(vqvae, items: list[dict], labels: torch.Tensor, batch_size: int) -> dict[str, float]:
    tally, device = 0, next(vqvae.parameters()).device
    with eval_except(vqvae):
        for start in range(0, len(items), batch_size):
            image = torch.stack([item["image"] for item in items[start : start + batch_size]]).to(device)
            tally = tally + error_tally(image, vqvae(image)[0], labels[start : start + batch_size])
    out = fidelity(tally)
    return {**out, **fidelity_ratios(out)}


@torch.no_grad()
def _out_of_context(detector: AnomalyDetector, items: list[dict], truth: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Token log-likelihoods [N, *grid] with the labelled anomalous tokens removed from every context (the masked
    Transformer's ``keep``), so that no anomalous token is judged on the anomaly's own earlier tokens."""
    out, device = [], next(detector.parameters()).device
    with eval_except(detector):
        for start in range(0, len(items), batch_size):
            image = torch.stack([item["image"] for item in items[start : start + batch_size]]).to(device)
            indices = detector.vqvae.index_quantize(image)
            sequencer = detector.sequencer(tuple(indices.shape[1:]))
            keep = sequencer.to_keep(truth[start : start + batch_size].to(device))
            seq = sequencer.to_sequence(indices)
            out.append(sequencer.to_grid(token_log_likelihood(detector.transformer, seq, keep).float()).cpu())
    return torch.cat(out)


def diagnose(
    config_file: str | list[str],
    checkpoint: str,
    section: str = "training",
    batch_size: int = 8,
    json_path: str | None = None,
    mask_restrict_to_flags: bool | None = None,
    **overrides,
) -> dict:
    """Prints (and returns) the map source, flag and mask precision/recall, and first-stage fidelity of one detector
    on one labelled datalist section, with the inference settings they were measured with (`settings`: a preset's
    N and M replace the checkpoint's).

    Args:
        config_file: the training configs (train.yaml and the preset), or configs/inference.yaml alone.
        checkpoint: a detector, e.g. <output_dir>/iltm/iter_00/model.pt.
        section: the labelled datalist section to measure on.
        batch_size: images per forward pass.
        json_path: also write the results there.
        mask_restrict_to_flags: the masks from the map restricted to flagged tokens; default: the config's
            `iltm#mask_restrict_to_flags`, else training's default (true).
        overrides: config ids, as on the bundle command line (--num_samples 10).
    """
    parser = ConfigParser()
    parser.read_config(config_file)
    check_ids(parser, list(overrides), str(config_file))  # `--json out.json` would otherwise become a config id
    parser.update(overrides)
    if "checkpoint" in parser:  # inference.yaml: the detector is built from the checkpoint's recorded settings,
        parser.update({"checkpoint": checkpoint, "data_labels": "require"})  # and loads labels only when asked
    detector = parser.get_parsed_content("network_def").to(parser.get_parsed_content("device"))
    if not isinstance(detector, AnomalyDetector):
        raise ValueError(
            f"{checkpoint}: diagnose measures an ILTM detector's flags, token masks and VQ-VAE; a baseline "
            f"({type(detector).__name__}) has none. Evaluate it instead (python -m monai.bundle run evaluating ...)."
        )
    load_detector(detector, checkpoint, parser.get_parsed_content("detector_settings"))  # a mismatch names the data
    datalist = parser.get_parsed_content("datalist")
    try:
        files = load_datalist(datalist, parser.get_parsed_content("dataset_dir"), section, labels="require")
    except DataError as e:  # its words are the bundle's; diagnose's own flag is --section
        raise DataError(str(e).replace("--data_section", "--section")) from None
    preprocessing = parser.get_parsed_content("preprocessing")
    items = [preprocessing(f) for f in tqdm(files, desc="loading", leave=False)]
    labels = torch.stack([item["label"] for item in items]) > 0
    if not labels.any() or labels.all():  # before minutes of maps that nothing could be measured against
        raise DataError(
            f"{datalist}: no {'normal' if labels.any() else 'labelled anomalous'} voxel in section {section!r}, so the "
            "pixel metrics and the flags' and masks' precision and recall are undefined there; pass a --section whose "
            "labels mark both (e.g. the validation section of a contaminated set)"
        )
    results: dict = {"checkpoint": checkpoint, "section": section, "n_images": len(items)}
    results["settings"] = {key: parser.get_parsed_content(key) for key in SETTINGS}
    settings = results["settings"]

    def as_trained(key: str, default):  # what training's mask passes use, where the config says (train.yaml)
        return parser.get_parsed_content(f"iltm#{key}") if f"iltm#{key}" in parser else default

    if mask_restrict_to_flags is None:
        mask_restrict_to_flags = as_trained("mask_restrict_to_flags", True)
    settings["mask_restrict_to_flags"] = bool(mask_restrict_to_flags)
    settings["mask_density_threshold"] = as_trained("mask_density_threshold", settings["density_threshold"])
    mask_score = "restricted_score" if settings["mask_restrict_to_flags"] else "unrestricted_score"
    for name, resample in (("full", True), ("no_resampling", False)):
        maps = _maps(detector, items, resample, batch_size)
        grid = tuple(maps["latent_flags"].shape[1:])
        truth = tokens_from_map(labels, grid, "any")
        metrics = pixel_metrics(maps["score"][:, 0].numpy(), labels[:, 0].numpy())
        anomalous = labels.flatten(1).any(dim=1)
        if 0 < int(anomalous.sum()) < len(anomalous):  # undefined on a section of one class (100 % contamination)
            metrics["image_auroc"] = image_auroc(maps["score"][:, 0].numpy(), labels[:, 0].numpy())
        row = {k: float(v) for k, v in metrics.items()}
        if resample:
            row["flags"] = dict(zip(("precision", "recall"), precision_recall(maps["latent_flags"], truth)))
            if truth.any() and not truth.all():  # the Transformer's ranking of the tokens, before any threshold
                row["token_auroc"] = pixel_auroc(-maps["latent_log_likelihood"].numpy(), truth.numpy())
                clean = _out_of_context(detector, items, truth, batch_size)
                row["token_auroc_anomalies_out_of_context"] = pixel_auroc(-clean.numpy(), truth.numpy())
        for rule, fraction in RULES:
            suspect = segment(maps[mask_score], settings["mask_density_threshold"])
            masks = tokens_from_map(suspect, grid, rule, fraction)
            p, r = precision_recall(masks, truth)
            row[f"masks_{rule}{'' if rule == 'any' else fraction}"] = {
                "masked": int(masks.sum()),
                "precision": p,
                "recall": r,
            }
        row["true_tokens"] = int(truth.sum())
        results[name] = row
    results["first_stage"] = _first_stage(detector.vqvae, items, labels, batch_size)
    print(json.dumps(results, indent=2))
    if json_path:
        write_json(json_path, results)
    return results


if __name__ == "__main__":
    fire_main(diagnose, serialize=lambda results: None)  # printed already
