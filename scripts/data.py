"""Datalists and input checks: bad input stops the run before training, with the file and the problem named."""

from __future__ import annotations

import difflib
import json
import logging
import os
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import LoadImage, MapTransform
from tqdm import tqdm

from scripts import cause_chain

logger = logging.getLogger(__name__)
PATH_KEYS = ("image", "label")
MASK_KEYS = ("mask", "masks", "seg", "segmentation", "gt", "ground_truth", "annotation")  # what users call a label


class DataError(ValueError):
    """Raised for input that cannot be used; the message always names the file.

    It is also logged at once: MONAI's config parser wraps it in a "Failed to evaluate" error, and the user should
    not have to read a traceback to learn which file is wrong.
    """

    quiet = False  # set while check_data collects the problems it then logs at once, and by scripts.cli.fire_main

    def __init__(self, message: str, advice: str = "") -> None:
        """`advice`: what to do, said once where many files share the problem (:func:`check_data`)."""
        super().__init__(f"{message} {advice}" if advice else message)
        self.problem, self.advice = message, advice
        if not DataError.quiet:
            logger.error(str(self))


def load_datalist(datalist: str, dataset_dir: str, section: str, labels: str = "auto") -> list[dict]:
    """Entries of one datalist section with paths resolved against `dataset_dir`.

    `labels`: "require" (every entry must have one, e.g. the test set), "auto" (kept only when every entry has one,
    so that batches collate), or "drop".
    """
    if not os.path.isfile(datalist):
        raise DataError(f"{datalist}: datalist file not found")
    try:
        with open(datalist) as f:
            sections = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{datalist}: not a valid JSON datalist ({e})") from e
    if not isinstance(sections, dict) or not sections.get(section):
        present = [k for k, v in sections.items() if isinstance(v, list) and v] if isinstance(sections, dict) else []
        close = difflib.get_close_matches(section, present, n=1, cutoff=0.5)
        has = f"; it has {', '.join(map(repr, present))}" if present else ""
        raise DataError(
            f"{datalist}: section {section!r} is missing or empty{has}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + "; add it (training needs `training` and `validation` sections, evaluation and inference a `test` "
            "section or another --data_section)"
        )
    base = dataset_dir
    if os.path.isfile(os.path.join(dataset_dir, "params.json")) and not _inside(datalist, dataset_dir):
        # a generated synthetic set's folder (the default dataset_dir) is never the base of a datalist kept elsewhere
        base = os.path.dirname(os.path.abspath(datalist))
    entries = [_resolve(entry, base) for entry in sections[section]]
    for i, entry in enumerate(entries):
        if "image" not in entry:
            raise DataError(f"{datalist}: entry {i} of {section!r} has no 'image'")
    unlabelled = [i for i, entry in enumerate(entries) if "label" not in entry]
    if labels == "require" and unlabelled:
        i, image = unlabelled[0], entries[unlabelled[0]]["image"]
        which = (
            f"entry {i} of {section!r} ({image}) has no 'label'"
            if len(unlabelled) == 1
            else f"{len(unlabelled)} of the {len(entries)} entries of {section!r} (the first: entry {i}, {image}) have no "
            "'label'"
        )
        raise DataError(
            f"{datalist}: {which}{_renamed([entries[i]])}. "
            "Evaluation and diagnosis need one per image (an all-zero mask for a normal one); inference "
            "(configs/inference.yaml alone) needs none."
        )
    labelled = sum("label" in e for e in entries)
    renamed = _renamed(entries) if labels != "drop" and labelled < len(entries) else ""
    if renamed:
        logger.warning(f"{datalist}: section {section!r} has entries without 'label'{renamed}")
    if labels == "auto" and 0 < labelled < len(entries):
        logger.warning(
            f"{datalist}: {labelled} of {len(entries)} entries of section {section!r} have a label; a section's labels "
            "are used only when every entry has one (for the checks and mask precision that need them), so none is "
            "used or checked. Label every entry of the section, or none."
        )
    if labels == "drop" or (labels == "auto" and labelled < len(entries)):
        entries = [{k: v for k, v in e.items() if k != "label"} for e in entries]
    missing = list(
        dict.fromkeys(  # once each: a zero mask shared by the normal images, an over-sampled image
            f"{e[k]}: {k} file not found"
            for e in entries
            for k in ("image", "label")
            if k in e and not os.path.isfile(e[k])
        )
    )
    if len(missing) == 1:
        raise DataError(f"{missing[0]} (datalist {datalist}, section {section!r})")
    if missing:
        relative = any(not os.path.isabs(str(e["image"])) for e in sections[section])
        every = relative and len(entries) > 1 and not any(os.path.isfile(e["image"]) for e in entries)
        hint = (
            f"\nEvery image is missing: the datalist's relative paths were resolved against dataset_dir {base}; pass "
            "--dataset_dir with the folder they are relative to."
            if every
            else ""
        )
        raise DataError(f"{len(missing)} files of section {section!r} of {datalist} not found:{listing(missing)}{hint}")
    return entries


def present_section(datalist: str, dataset_dir: str, section: str) -> list[dict]:
    """A section's entries as :func:`load_datalist` gives them, or [] where the datalist lacks it: for checking it
    early, beside another, where the run that needs it says so itself."""
    try:
        with open(datalist) as f:
            present = bool((json.load(f) or {}).get(section))
    except (OSError, ValueError, AttributeError):
        present = False
    return load_datalist(datalist, dataset_dir, section) if present else []


def _renamed(entries: Sequence[dict]) -> str:
    """Where entries carry their masks under another key, which the bundle would silently leave unread."""
    keys = sorted({k for e in entries if "label" not in e for k in e if k.lower() in MASK_KEYS})
    return (
        f" but {', '.join(map(repr, keys))}: the bundle reads masks from 'label' alone; rename that key" if keys else ""
    )


def _inside(path: str, folder: str) -> bool:
    return os.path.abspath(path).startswith(os.path.abspath(folder) + os.sep)


def _resolve(entry: dict, dataset_dir: str, path_keys: Sequence[str] = PATH_KEYS) -> dict:
    """Joins only path fields with `dataset_dir`; MONAI's `load_decathlon_datalist` would also turn any other string
    that happens to name an existing file or folder (e.g. a category "bottle") into a path."""
    if not isinstance(entry, dict):
        return {"image": os.path.join(dataset_dir, str(entry))}
    return {k: os.path.join(dataset_dir, v) if k in path_keys and isinstance(v, str) else v for k, v in entry.items()}


class CheckImaged(MapTransform):
    """Validates freshly loaded, channel-first images (and their labels) against what the bundle is configured for."""

    NARROW = 0.02  # an image spanning less of the range is probably on another scale: warning
    warned = 0

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int,
        channels: int,
        label_key: str = "label",
        intensity_range: Sequence[float] | None = None,
        max_clipped: float = 0.05,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.spatial_dims, self.channels, self.label_key = spatial_dims, channels, label_key
        self.intensity_range, self.max_clipped = intensity_range, max_clipped

    def _check_scale(self, name: str, img: torch.Tensor) -> None:
        """Inputs on another intensity scale (a 16-bit PNG, a [0, 1] float volume) give meaningless maps silently."""
        low, high = (float(v) for v in self.intensity_range)
        x = torch.as_tensor(img).float()
        lo, hi, span = float(x.min()), float(x.max()), high - low
        clipped = float(((x < low - 0.01 * span) | (x > high + 0.01 * span)).float().mean())
        if clipped > self.max_clipped:
            raise DataError(
                f"{name}: {clipped:.0%} of its intensities lie outside [{low:g}, {high:g}] (intensity_min, "
                f"intensity_max), where the bundle clips them; the image spans {lo:g} to {hi:g}.",
                "Another bit depth or scale? Set intensity_min and intensity_max to the range of your data when "
                "training (a trained detector keeps the range it was trained with: convert the images to it), or raise "
                f"max_clipped_fraction ({self.max_clipped:g}) where clipping is intended.",
            )
        if hi > lo and (hi - lo) < self.NARROW * span and CheckImaged.warned < 5:
            CheckImaged.warned += 1
            logger.warning(
                f"{name}: spans {lo:g} to {hi:g}, {(hi - lo) / span:.1%} of [{low:g}, {high:g}] (intensity_min, "
                "intensity_max): on another scale (e.g. floats in [0, 1] for 0-255)? Its map would be meaningless."
                + (" Further such warnings are not shown." if CheckImaged.warned == 5 else "")
            )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = getattr(img, "meta", {}).get("filename_or_obj", key)
            if img.ndim - 1 != self.spatial_dims:
                raise DataError(
                    f"{name}: has {img.ndim - 1} spatial dimensions, the bundle is configured for "
                    f"{self.spatial_dims} (spatial_dims)"
                )
            if self.spatial_dims == 3 and 1 in img.shape[1:]:  # resized to a volume, and its maps saved squeezed
                raise DataError(
                    f"{name}: a single slice (shape {tuple(img.shape[1:])}), not a volume; a 3D detector needs "
                    "volumes (slices go to a 2D detector, spatial_dims 2)"
                )
            if key != self.label_key:
                mode = getattr(img, "meta", {}).get("mode")
                if mode in ("P", "PA"):  # PIL's reader gives the colour table's indices as one grey channel
                    raise DataError(
                        f"{name}: a palette image (PIL mode {mode}), whose values index a colour table and are no "
                        "intensities: convert it to grey or RGB first (PIL: Image.open(path).convert('L') or 'RGB')"
                    )
                if img.shape[0] == 1 and self.channels > 1:
                    d[key] = img = img.repeat(self.channels, *([1] * self.spatial_dims))
                if img.shape[0] != self.channels:
                    where = f"{name}: has {img.shape[0]} channels, the bundle is configured for {self.channels}"
                    if mode in ("LA", "RGBA"):
                        raise DataError(
                            f"{where} (in_channels): its last one is PIL's alpha (mode {mode}); drop it "
                            f"(PIL: Image.open(path).convert('{'L' if self.channels == 1 else 'RGB'}'))"
                        )
                    raise DataError(f"{where} (in_channels).", f"Convert the images, or train with --in_channels "
                                    f"{img.shape[0]} (a trained detector keeps its channels).")  # fmt: skip
            if not torch.isfinite(torch.as_tensor(img)).all():
                raise DataError(f"{name}: contains NaN or Inf values")
            if key != self.label_key and self.intensity_range is not None:
                self._check_scale(name, img)
        if self.label_key in d and self.keys[0] in d:
            image, label = d[self.keys[0]], d[self.label_key]
            name = getattr(label, "meta", {}).get("filename_or_obj", self.label_key)
            if tuple(image.shape[1:]) != tuple(label.shape[1:]):
                raise DataError(
                    f"{name}: label shape {tuple(label.shape[1:])} does not match its image's "
                    f"{tuple(image.shape[1:])}"
                )
            _check_aligned(name, image, label)
        return d


def _check_aligned(name: str, image: Any, label: Any) -> None:
    """A label of the image's shape but another affine (a mask saved in another frame) lies elsewhere in space: each
    would be resampled in its own frame and then scored voxel by voxel as if aligned. Header round-off (qform against
    sform, float rounding) passes: origins within a tenth of a voxel, axes within 0.1 %. Files without geometry
    (PIL's images, numpy arrays: an identity affine) are not compared."""
    files = [str(getattr(x, "meta", {}).get("filename_or_obj", "")).lower() for x in (image, label)]
    if any(f.endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy", ".npz")) for f in files):
        return
    a, b = (getattr(x, "affine", None) for x in (image, label))
    if a is None or b is None or a.shape != b.shape:
        return
    a, b = (torch.as_tensor(x, dtype=torch.float64) for x in (a, b))
    axes_a, axes_b = a[:-1, :-1], b[:-1, :-1]
    voxel = float(axes_a.norm(dim=0).min()) or 1.0
    moved = float((a[:-1, -1] - b[:-1, -1]).norm()) > 0.1 * voxel
    turned = not torch.allclose(axes_a, axes_b, rtol=0.0, atol=1e-3 * float(axes_a.abs().max() or 1.0))
    if moved or turned:
        origin = [[round(float(v), 3) for v in x[:-1, -1]] for x in (a, b)]
        spacing = [[round(float(v), 3) for v in x[:-1, :-1].norm(dim=0)] for x in (a, b)]
        direction = (
            ""
            if origin[0] != origin[1] or spacing[0] != spacing[1]
            else (
                f"; axes {b[:-1, :-1].numpy().round(3).tolist()}, the image's {a[:-1, :-1].numpy().round(3).tolist()}"
            )
        )
        raise DataError(
            f"{name}: its affine differs from its image's (origin {origin[1]}, voxel size {spacing[1]}; the image's "
            f"{origin[0]}, {spacing[0]}{direction}): the label lies elsewhere in space.",
            "Resample the labels onto their images' grids (or fix their headers) before training or evaluation.",
        )


class ShieldStringsd(MapTransform):
    """Moves string entries named `<key>_*` aside (`restore=False`) and back (`restore=True`) around a resampling.

    MONAI 1.6's `Spacingd` updates every `<key>_*` entry of a NIfTI's data as a metadata dict; MONAI Label's request
    data carries `image_path`, a string there, which it reads again when it writes the result.
    """

    PREFIX = "_shielded_"

    def __init__(self, keys: KeysCollection, restore: bool = False) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.restore = restore

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for name in list(d):
            if not isinstance(name, str):
                continue
            if self.restore and name.startswith(self.PREFIX):
                d[name[len(self.PREFIX) :]] = d.pop(name)
            elif not self.restore and isinstance(d[name], str) and any(name.startswith(f"{k}_") for k in self.keys):
                d[self.PREFIX + name] = d.pop(name)
        return d


class BinarizeLabeld(MapTransform):
    """Any voxel above `threshold` in any channel is anomalous: masks arrive as 0/255 PNGs, RGB masks or NIfTI labels.

    A label of many grey levels (a JPEG mask's compression noise, anti-aliased edges) is warned about once: above the
    default threshold 0, every faint value counts, and a mask can grow well beyond its defect without an error. So is
    a label anomalous on every voxel: a mask whose background is 1 (a MATLAB or class-index export) reads as all defect.
    """

    GREY_LEVELS = 8  # more distinct values than a label of a few classes (BraTS: 0, 1, 2, 4) has

    def __init__(self, keys: KeysCollection, threshold: float = 0.0) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.threshold, self.warned, self.warned_full = threshold, False, False

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            anomalous = (d[key] > self.threshold).any(dim=0, keepdim=True)
            name = getattr(d[key], "meta", {}).get("filename_or_obj", key)
            if not self.warned and (levels := torch.unique(torch.as_tensor(d[key]))).numel() > self.GREY_LEVELS:
                self.warned = True
                logger.warning(
                    f"{name}: a label of {levels.numel()} grey levels ({float(levels[0]):g}-{float(levels[-1]):g}); "
                    f"every voxel above label_threshold {self.threshold:g} is anomalous, "
                    f"{float(anomalous.float().mean()):.1%} of this one."
                    + (
                        " For JPEG or anti-aliased masks pass e.g. --label_threshold 127 (on 0-255)."
                        if not self.threshold
                        else ""
                    )
                    + " Said once per run."
                )
            if not self.warned_full and anomalous.all():
                self.warned_full = True
                low = float(torch.as_tensor(d[key]).min())
                logger.warning(
                    f"{name}: every voxel of this label is anomalous (its lowest value, {low:g}, is above "
                    f"label_threshold {self.threshold:g}). If its background is {low:g} rather than 0, pass "
                    f"--label_threshold {low:g}. Said once per run."
                )
            d[key] = anomalous.float()
        return d


def intensity_band(entries: Sequence[dict], images: int = 50, voxels: int = 100_000) -> tuple[float, float, float]:
    """The 0.1 and 99.9 percentiles of the raw intensities of up to `images` evenly spaced entries (`voxels` evenly
    spaced voxels each): the band to map to [0, 1] where the images use a narrow part of intensity_min..max; and their
    maximum, since bright anomalies (hot lesions) can lie above the band."""
    load = LoadImage(image_only=True)
    values = [torch.as_tensor(load(e["image"])).flatten() for e in entries[:: max(1, len(entries) // images)]]
    sample = torch.cat([v[:: max(1, len(v) // voxels)].double() for v in values])
    low, high = torch.quantile(sample, torch.tensor([0.001, 0.999], dtype=torch.float64))
    return float(low), float(high), float(sample.max())


# entries each transform has loaded without a problem in this process (weak: a transform's id can be reused)
_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_data(
    entries: Sequence[dict], transform: Callable, desc: str = "checking data", also: Sequence[dict] = ()
) -> list[dict]:
    """Runs the deterministic preprocessing over every entry once, so that bad input fails before any work, with
    every bad entry named at once rather than one per rerun.

    `also`: entries checked in the same pass but not returned (training checks its validation section with its own,
    so that a bad file in either is named in one run); the later check of those entries skips what passed here.
    MONAI wraps a transform's exception in layers of `RuntimeError`; each problem is reported as the innermost
    cause, named with the entry's files, and the first one's traceback is kept as the error's cause.
    """
    problems: list[tuple[str, BaseException]] = []
    every = [*entries, *also]
    try:
        passed = _checked.setdefault(transform, set())
    except TypeError:  # a transform that cannot be weakly referenced: nothing is remembered
        passed = set()
    quiet, DataError.quiet = DataError.quiet, True
    try:
        for entry in tqdm(every, desc=desc, leave=False):
            key = json.dumps(entry, sort_keys=True, default=str)
            if key in passed:
                continue
            try:
                transform(entry)
                passed.add(key)
            except Exception as e:  # noqa: BLE001 - every failure here is the input's, reported with its file
                cause = cause_chain(e)[-1]
                files = ", ".join(f"{k}: {v}" for k, v in entry.items() if k in ("image", "label"))
                why = (
                    str(cause)
                    if isinstance(cause, DataError)
                    else f"{files}: cannot be loaded ({type(cause).__name__}: {cause})"
                )
                problems.append((why, cause))
    finally:
        DataError.quiet = quiet
    problems = list({why: (why, cause) for why, cause in problems}.values())  # an over-sampled bad entry: once
    if not problems:
        return list(entries)
    if len(problems) == 1:
        raise DataError(problems[0][0]) from problems[0][1]  # an innermost cause: no loop in the chain
    advice = [cause.advice for _, cause in problems if isinstance(cause, DataError) and cause.advice]
    lines = [cause.problem if isinstance(cause, DataError) and cause.advice else why for why, cause in problems]
    said = "".join(f"\n{a}" for a in dict.fromkeys(advice))  # each piece of advice once, after the files
    raise DataError(f"{len(lines)} of {len(every)} entries cannot be used:{listing(lines)}{said}") from problems[0][1]


def listing(problems: Sequence[str], most: int = 20) -> str:
    """One indented line per problem, the first `most` of them: enough to fix a folder in one pass."""
    shown = [*problems[:most], *([f"... and {len(problems) - most} more"] if len(problems) > most else [])]
    return "".join(f"\n  {line}" for line in shown)
