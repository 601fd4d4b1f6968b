r"""Which recurring anomalies did ILTM's token masks catch? A diagnostic for runs on the embedded synthetic sets.

A run's overall mask recall hides what matters to the Transformer: an anomaly that recurs in many training images is
learned as normal unless *its* tokens are masked, whatever happens to the others. Grouping the training images by the
anomalies ``anomalies.json`` says they carry (a 2D defect's kind, a 3D lesion's site, and its prototype; an image with
two anomalies forms a group of its own), this gives each group's recall and the share of its images whose anomaly no
mask touches, beside the masked share of the normal images' tokens (docs/experiments.md, "Four seeds (0.6.1)").
Labels are read as stored (anomalous where above 0) and downsampled with the "any" rule: right for the embedded sets,
whose files are at the presets' image size.

    python -m scripts.synthetic mask_recall --run_dir runs/sweep2d/seed_0/runs/r0.80 \
        --data_dir runs/sweep2d/seed_0/data/r0.80 [--iteration 3]
"""

from __future__ import annotations

import json
import os

import torch
from monai.transforms import LoadImage

from scripts.checkpoint import load_checkpoint
from scripts.experiments_report import final_iteration
from scripts.iltm import tokens_from_map


def _name(anomaly: dict) -> str:
    kind = anomaly.get("kind", anomaly.get("site", "anomaly"))
    return f"{kind}#{anomaly['prototype']}" if anomaly.get("prototype", -1) >= 0 else f"{kind} (one-off)"


def _masks_file(run_dir: str, iteration: int | None) -> str:
    """The masks iteration `iteration` trained with; by default those of the run's final model (a loop that stopped
    early has written the masks of one more iteration, never trained)."""
    k = final_iteration(run_dir) if iteration is None else int(iteration)
    if k < 1:
        raise ValueError(
            f"{run_dir}: {'the final model is ' * (iteration is None)}iteration 0, which ILTM computes no masks for "
            "(it trains on every token, or on the masks a run was given with iltm#initial_masks)"
        )
    path = os.path.join(run_dir, "iltm", f"iter_{k:02d}", "token_masks.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no token masks for ILTM iteration {k} in this run")
    return path


def _check_same_images(run_dir: str, data_dir: str, images: list[str]) -> None:
    """The run's record (`run.json`: each training file's size) must know these images, at these sizes: another
    ratio's or seed's folder has the same file names but other images."""
    record = os.path.join(run_dir, "run.json")
    if not os.path.isfile(record):
        return
    with open(record) as f:
        sizes = {path.replace("\\", "/"): stamp[0] for path, stamp in json.load(f).get("training", {}).items()}
    for image in images:
        known = [size for path, size in sizes.items() if path.endswith("/" + image)]
        size = os.path.getsize(os.path.join(data_dir, image))
        if known != [size]:
            raise ValueError(f"{os.path.join(data_dir, image)}: not a training image of {run_dir} ({record} records "
                             f"{known or 'no such file'}, this one has {size} bytes); pass the run's own dataset folder")  # fmt: skip


def mask_recall(run_dir: str, data_dir: str, iteration: int | None = None) -> dict[str, dict]:
    """Per group of training images with the same anomalies: images, labelled tokens per image, recall, images
    wholly missed, and the masked share of the tokens outside the labels; ``normal`` for defect-free images.

    `iteration`: whose masks (default: those the run's final model was trained with). Images are matched to the masks
    by their path relative to `data_dir`, so a dataset folder that moved since the run still matches.
    """
    path = _masks_file(run_dir, iteration)
    listing = os.path.join(data_dir, "anomalies.json")
    if not os.path.isfile(listing):
        raise FileNotFoundError(f"{listing}: not found; mask_recall needs a dataset made by scripts.synthetic")
    with open(listing) as f:
        entries = json.load(f)["training"]
    if not entries:
        raise ValueError(f"{listing}: no training images; pass the dataset folder the run trained on")
    _check_same_images(run_dir, data_dir, [e["image"] for e in entries])
    with open(os.path.join(data_dir, "datalist.json")) as f:
        labels = {e["image"]: e["label"] for e in json.load(f)["training"]}
    stored = load_checkpoint(path)
    by_suffix = {key.replace(os.sep, "/"): mask for key, mask in stored.items()}
    load = LoadImage(image_only=True, ensure_channel_first=True)
    groups: dict[str, dict] = {}
    for entry in entries:
        masks = [m for key, m in by_suffix.items() if key.endswith("/" + entry["image"])]
        if len(masks) != 1:
            raise ValueError(f"{path}: {len(masks)} masks match {entry['image']} of {data_dir}")
        mask = masks[0].bool()
        label = torch.as_tensor(load(os.path.join(data_dir, labels[entry["image"]])))[None] > 0
        truth = tokens_from_map(label, tuple(mask.shape))[0]
        name = ", ".join(sorted(_name(a) for a in entry.get("defects", entry.get("lesions", [])))) or "normal"
        group = groups.setdefault(name, {"images": 0, "truth": 0, "hits": 0, "missed": 0, "false": 0, "outside": 0})
        hits = int((mask & truth).sum())
        group["images"] += 1
        group["truth"] += int(truth.sum())
        group["hits"] += hits
        group["missed"] += int(hits == 0 and bool(truth.any()))
        group["false"] += int((mask & ~truth).sum())
        group["outside"] += int((~truth).sum())
    report = {}
    for name, g in sorted(groups.items()):
        report[name] = {
            "images": g["images"],
            "labelled_tokens_per_image": g["truth"] / g["images"],
            "recall": g["hits"] / g["truth"] if g["truth"] else float("nan"),
            "images_missed": g["missed"],
            "masked_outside_labels": g["false"] / g["outside"] if g["outside"] else float("nan"),
        }
    print(f"{path}:")
    for name, r in report.items():
        print(f"  {name:32s} {r['images']:4d} image{'s' if r['images'] != 1 else ' '}, {r['labelled_tokens_per_image']:5.1f} tokens each: recall "
              f"{r['recall']:.2f}, {r['images_missed']} wholly missed; {r['masked_outside_labels']:.1%} of the "
              f"other tokens masked")  # fmt: skip
    return report
