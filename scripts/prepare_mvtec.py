"""MVTec AD datalists for ILTM's contamination protocol (Patel et al., ICCV Workshops 2023, §3.3).

The paper trains on MVTec AD categories whose training sets contain a chosen fraction of anomalous images. Those
anomalies can only come from the official test split, so each category's test split is divided once (fixed by the
seed, shared by every ratio): a test set, a validation set, and the rest - the anomalous training pool. For each
ratio a training set of the category's usual size (its number of `train/good` images) mixes normal and anomalous
images to that fraction, under-sampling the normal images and over-sampling the pool when it is too small.
Toothbrush and transistor are left out by default: too few anomalies to fill a pool.

Nothing is downloaded and, unless ``copy`` is set, no image is copied: datalist paths are relative to the MVTec AD
root, which is the ``--dataset_dir`` to train with. Normal images have no mask file; one all-zero mask per category
and image size is written to ``OUT_DIR/zero_masks/`` and referenced by a path relative to the root, so that every
entry carries a label (the test set needs one; training labels only feed the token-mask diagnostics).

CLI::

    python -m scripts.prepare_mvtec --root MVTEC_DIR --out OUT_DIR [--ratios 0,0.2,0.4,0.6,0.8] [--size 256] [--seed 0]

writes ``OUT_DIR/datalist_<category>_r<ratio, 2 decimals>.json`` (e.g. ``datalist_bottle_r0.40.json``) and
``OUT_DIR/summary.csv`` / ``summary.md``. The protocol's shared helpers are in :mod:`scripts.contamination`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from scripts.cli import fire_main
from scripts.contamination import (
    LayoutError,
    check_no_leakage,
    check_protocol,
    count_at_ratio,
    draw,
    entry_counts,
    parse_names,
    parse_ratios,
    ratio_tag,
    rng,
    write_summary,
)
from scripts.data import listing
from scripts.files import write_json

DEFAULT_RATIOS = (0.0, 0.2, 0.4, 0.6, 0.8)
EXCLUDED = ("toothbrush", "transistor")  # paper §3.3: too few anomalous images for a contamination pool
NORMAL = "good"
MASK_SUFFIX = "_mask.png"
OTHER_IMAGES = (".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------- MVTec AD


@dataclass(frozen=True)
class Sample:
    """One MVTec image; paths are relative to the MVTec root, with forward slashes."""

    image: str
    defect: str  # "good" for normal images
    label: str | None = None  # ground-truth mask of an anomalous image

    @property
    def anomalous(self) -> int:
        return int(self.defect != NORMAL)


@dataclass
class Category:
    """A category's files: the normal training images, and the official test split by defect type."""

    name: str
    train_good: list[Sample]
    test_good: list[Sample]
    test_defects: dict[str, list[Sample]]


@dataclass
class CategorySplit:
    """The ratio-independent part of the protocol: evaluation sets and the anomalous training pool."""

    validation: list[Sample]
    test: list[Sample]
    pool: list[Sample]


def _pngs(folder: str) -> list[str]:
    """The PNG files of a folder; other images are named, since MVTec AD's layout has PNG only and they are left out."""
    names = [f for f in sorted(os.listdir(folder)) if not f.startswith(".")]
    other = [f for f in names if f.lower().endswith(OTHER_IMAGES)]
    if other:
        shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        logger.warning(
            f"{folder}: {len(other)} image(s) not in PNG left out ({shown}); convert them to PNG to use them"
        )
    return [f for f in names if f.lower().endswith(".png")]


def _rel(*parts: str) -> str:
    """A datalist path: relative, forward slashes on every OS."""
    return "/".join(parts)


def scan_category(root: str, name: str) -> Category:
    """Reads `<name>/train/good`, `<name>/test/<defect>` and `<name>/ground_truth/<defect>/<stem>_mask.png`.

    Every anomalous test image must have its mask, and a mask must have its image's size: a missing or mismatched
    file is reported here, by path, instead of after hours of training.
    """
    cat_dir = os.path.join(root, name)
    train_dir = os.path.join(cat_dir, "train", NORMAL)
    test_dir = os.path.join(cat_dir, "test")
    if not os.path.isdir(train_dir):
        raise LayoutError(f"{train_dir}: folder not found (expected <category>/train/good/*.png)")
    if not os.path.isdir(test_dir):
        raise LayoutError(f"{test_dir}: folder not found (expected <category>/test/<defect or good>/*.png)")
    train_good = [Sample(_rel(name, "train", NORMAL, f), NORMAL) for f in _pngs(train_dir)]
    if not train_good:
        raise LayoutError(f"{train_dir}: no PNG images")
    test_good: list[Sample] = []
    test_defects: dict[str, list[Sample]] = {}
    problems: list[str] = []  # every missing or mismatched mask at once, not one per run
    for defect in sorted(d for d in os.listdir(test_dir) if os.path.isdir(os.path.join(test_dir, d))):
        files = _pngs(os.path.join(test_dir, defect))
        if defect == NORMAL:
            test_good = [Sample(_rel(name, "test", NORMAL, f), NORMAL) for f in files]
            continue
        samples, masks_dir = [], os.path.join(cat_dir, "ground_truth", defect)
        masks = {m.lower(): m for m in os.listdir(masks_dir)} if os.path.isdir(masks_dir) else {}  # 000_mask.PNG too
        for f in files:
            image, mask = _rel(name, "test", defect, f), f"{os.path.splitext(f)[0]}{MASK_SUFFIX}"
            label = _rel(name, "ground_truth", defect, masks.get(mask.lower(), mask))
            if not os.path.isfile(os.path.join(root, label)):
                problems.append(f"{os.path.join(root, label)}: mask of anomalous image {image} not found")
            elif image_size(root, image) != image_size(root, label):
                problems.append(f"{os.path.join(root, label)}: mask size {image_size(root, label)} differs from its "
                                f"image's {image_size(root, image)} ({image})")  # fmt: skip
            samples.append(Sample(image, defect, label))
        if samples:
            test_defects[defect] = samples
    if problems:
        raise LayoutError(problems[0] if len(problems) == 1 else f"{name}: {len(problems)} problems{listing(problems)}")
    if not test_good and not test_defects:
        raise LayoutError(f"{test_dir}: no test images (expected <category>/test/<defect or good>/*.png)")
    return Category(name, train_good, test_good, test_defects)


def image_size(root: str, rel_path: str) -> tuple[int, int]:
    """(width, height) from the PNG header, without decoding the pixels."""
    path = os.path.join(root, rel_path)
    try:
        with Image.open(path) as img:
            return img.size
    except OSError as e:
        raise LayoutError(f"{path}: cannot be read as an image ({e})") from e


def find_categories(root: str, categories: Sequence[str], exclude: Sequence[str], out: str) -> list[str]:
    """The requested categories, or every sub-folder of the root (except the output folder) minus `exclude`."""
    if not os.path.isdir(root):
        raise LayoutError(f"{root}: MVTec AD folder not found")
    if all(os.path.isdir(os.path.join(root, sub)) for sub in ("train", "test")):
        raise LayoutError(f"{root}: a category folder (it holds train/ and test/); pass the folder above it as --root "
                          f"and --categories {os.path.basename(root.rstrip(os.sep))}")  # fmt: skip
    out_real = os.path.realpath(out)
    found = sorted(
        d
        for d in os.listdir(root)
        if os.path.isdir(os.path.join(root, d))
        and not d.startswith(".")
        and os.path.realpath(os.path.join(root, d)) != out_real
    )
    if categories:
        missing = [c for c in categories if not os.path.isdir(os.path.join(root, c))]
        if missing:
            raise LayoutError(f"{os.path.join(root, missing[0])}: category folder not found; {root} holds "
                              f"{', '.join(found) or 'no folder'}")  # fmt: skip
        dropped = [c for c in categories if c in exclude]
        if dropped:  # asked for by name: said, not silently left out
            raise LayoutError(f"{', '.join(dropped)}: asked for with --categories but excluded (--exclude; by default "
                              f"{', '.join(EXCLUDED)}, which the paper leaves out: too few anomalies); pass "
                              "--exclude '' to prepare it")  # fmt: skip
        return list(categories)
    if not found:
        raise LayoutError(f"{root}: no category folders (expected <root>/<category>/train/good/*.png)")
    kept = [c for c in found if c not in exclude]
    if not kept:
        raise LayoutError(f"{root}: every category found ({', '.join(found)}) is excluded")
    return kept


def _interleave_by_defect(defects: dict[str, list[Sample]], seed: int, category: str) -> list[Sample]:
    """Anomalous test images in a seeded order that cycles through the defect types.

    Taking a prefix of this order for the test set (then the validation set) gives each defect type its share,
    so a small test set still shows every kind of defect the category has.
    """
    shuffled = {d: [s[i] for i in rng(seed, category, "defect", d).permutation(len(s))] for d, s in defects.items()}
    names = [sorted(defects)[i] for i in rng(seed, category, "defect order").permutation(len(defects))]
    ordered = []
    for k in range(max((len(s) for s in shuffled.values()), default=0)):
        ordered.extend(shuffled[d][k] for d in names if k < len(shuffled[d]))
    return ordered


def split_category(
    category: Category, n_val: int, val_anomalous: int, n_test: int, test_anomalous: int, seed: int
) -> CategorySplit:
    """Test and validation sets from the official test split; the remaining anomalous images form the pool.

    Normal evaluation images come from `test/good` (never used for training), so they cost the pool nothing.
    """
    if not (0 <= val_anomalous <= n_val and 0 <= test_anomalous <= n_test):
        raise ValueError(
            f"anomalous counts must be within the set sizes: validation {val_anomalous}/{n_val}, "
            f"test {test_anomalous}/{n_test}"
        )
    anomalous = _interleave_by_defect(category.test_defects, seed, category.name)
    normal = [category.test_good[i] for i in rng(seed, category.name, "test good").permutation(len(category.test_good))]
    n_val_normal, n_test_normal = n_val - val_anomalous, n_test - test_anomalous
    if len(anomalous) < test_anomalous + val_anomalous:
        raise LayoutError(
            f"{category.name}: {len(anomalous)} anomalous test images, {test_anomalous} (test) + {val_anomalous} "
            f"(validation) needed; lower --test_anomalous or --val_anomalous"
        )
    if len(normal) < n_test_normal + n_val_normal:
        raise LayoutError(
            f"{category.name}: {len(normal)} images in test/good, {n_test_normal} (test) + {n_val_normal} "
            f"(validation) needed; lower --n_test or --n_val (normal images: n_test - test_anomalous, "
            f"n_val - val_anomalous)"
        )
    test = normal[:n_test_normal] + anomalous[:test_anomalous]
    validation = normal[n_test_normal : n_test_normal + n_val_normal]
    validation += anomalous[test_anomalous : test_anomalous + val_anomalous]
    return CategorySplit(validation, test, pool=anomalous[test_anomalous + val_anomalous :])


def training_set(
    category: Category, pool: Sequence[Sample], ratio: float, seed: int, size: int | None, oversample: bool
) -> list[Sample]:
    """`size` images (default: the number in `train/good`), `count_at_ratio(size, ratio)` of them anomalous.

    Normal images are drawn from `train/good`, anomalous ones from the pool, each by :func:`draw` with a stream
    that does not depend on the ratio, so the sets at increasing ratios are nested.
    """
    size = len(category.train_good) if size is None else int(size)
    n_anomalous = count_at_ratio(size, ratio)
    if size - n_anomalous > len(category.train_good) and oversample:
        logger.warning(f"{category.name} at {ratio:.0%}: {size - n_anomalous} normal training images from the "
                       f"{len(category.train_good)} in train/good, so some repeat (--train_size {size} is above "
                       "that count)")  # fmt: skip
    normal = draw(
        category.train_good,
        size - n_anomalous,
        rng(seed, category.name, "train normal"),
        f"{category.name}: normal training images",
        oversample,
    )
    anomalous = draw(
        pool,
        n_anomalous,
        rng(seed, category.name, "train anomalous"),
        f"{category.name}: anomalous training images (pool of anomalous test images left after validation and test)",
        oversample,
    )
    return normal + anomalous


class MaskWriter:
    """Labels for the datalist: ground-truth masks of anomalous images, shared all-zero masks for normal ones.

    With `copy`, images and masks are also written, resized to `size`, under `out/images/` (same relative layout),
    and every path is relative to `out`; otherwise paths are relative to `root` and only the zero masks are written
    (at each image's own size, because the bundle checks that an image and its label have the same size before
    resizing them).
    """

    def __init__(self, root: str, out: str, copy: bool, size: int) -> None:
        self.root, self.out, self.copy, self.size = root, out, copy, size
        self.base = out if copy else root  # what paths in the datalist are relative to
        self.written: set[str] = set()
        self.sizes: dict[str, tuple[int, int]] = {}  # image -> (width, height); each header read once

    def _relative(self, path: str) -> str:
        """Relative to the base; absolute where that would climb out of a base reached through a symlink (the
        system resolves `..` from the link's target, and the zero masks were not found)."""
        relative = os.path.relpath(path, self.base)
        if relative.startswith(os.pardir) and os.path.realpath(self.base) != self.base:
            return os.path.realpath(path).replace(os.sep, "/")
        return relative.replace(os.sep, "/")

    def _copy(self, rel: str, is_mask: bool) -> str:
        dest = os.path.join(self.out, "images", *rel.split("/"))
        if dest not in self.written:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with Image.open(os.path.join(self.root, rel)) as img:
                resample = Image.Resampling.NEAREST if is_mask else Image.Resampling.BOX  # BOX = area averaging
                img.resize((self.size, self.size), resample).save(dest)
            self.written.add(dest)
        return self._relative(dest)

    def _zero_mask(self, category: str, image: str) -> str:
        if image not in self.sizes:
            self.sizes[image] = (self.size, self.size) if self.copy else image_size(self.root, image)
        width, height = self.sizes[image]
        dest = os.path.join(self.out, "zero_masks", f"{category}_{width}x{height}.png")
        if dest not in self.written:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            Image.fromarray(np.zeros((height, width), np.uint8)).save(dest)
            self.written.add(dest)
        return self._relative(dest)

    def entry(self, category: str, sample: Sample) -> dict:
        image = self._copy(sample.image, False) if self.copy else sample.image
        if sample.label is None:
            label = self._zero_mask(category, sample.image)
        else:
            label = self._copy(sample.label, True) if self.copy else sample.label
        return {
            "image": image,
            "label": label,
            "category": category,
            "anomalous": sample.anomalous,
            "defect": sample.defect,
        }


def _check_older_copies(out: str, protocol: dict) -> None:
    """`copy` and `size` against an older preparation's (protocol.json before 0.7.7 did not record them), as its
    files tell them: copies under `out/images` at their size, or none."""
    path = os.path.join(out, "protocol.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        if "copy" in json.load(f):
            return  # check_protocol compared them
    copies = (os.path.join(d, n) for d, _, names in sorted(os.walk(os.path.join(out, "images"))) for n in sorted(names))
    first = next((p for p in copies if p.lower().endswith(".png")), None)
    there = {
        "copy": first is not None,
        "size": image_size(os.path.dirname(first), os.path.basename(first))[0] if first else None,
    }
    differ = [f"{k}: {v!r} there, {protocol[k]!r} now" for k, v in there.items() if protocol[k] != v]
    if differ:
        raise LayoutError(f"{out}: holds datalists prepared with other copies ({'; '.join(differ)}); use another --out")


def prepare_category(
    root: str,
    out: str,
    name: str,
    ratios: Sequence[float],
    seed: int,
    splits: dict[str, int],
    writer: MaskWriter,
    train_size: int | None,
    oversample: bool,
) -> tuple[list[dict], dict[str, dict]]:
    """The category's datalists by file name, one per ratio, with their summary rows; drawn whole before any is
    written, so that a ratio that fails leaves none."""
    category = scan_category(root, name)
    split = split_category(category, seed=seed, **splits)
    trains = [training_set(category, split.pool, ratio, seed, train_size, oversample) for ratio in ratios]  # may fail:
    validation = [writer.entry(name, s) for s in split.validation]  # then before any file is written
    test = [writer.entry(name, s) for s in split.test]
    rows, datalists = [], {}
    for ratio, train in zip(ratios, trains):
        datalist = {
            "description": (
                f"MVTec AD {name}, {ratio:.0%} anomalous training images (ILTM contamination protocol, seed {seed}). "
                f"Paths are relative to the {'output folder' if writer.copy else 'MVTec AD root'}: pass it as "
                f"--dataset_dir."
            ),
            "category": name,
            "anomalous_ratio": ratio,
            "seed": seed,
            "training": [writer.entry(name, s) for s in train],
            "validation": validation,
            "test": test,
        }
        filename = f"datalist_{name}_{ratio_tag(ratio)}.json"
        check_no_leakage(datalist, filename)
        datalists[filename] = datalist
        anomalous = [s.image for s in train if s.anomalous]
        train_normal, train_anomalous = entry_counts(datalist["training"])
        rows.append(
            {
                "category": name,
                "ratio": f"{ratio:.2f}",
                "train": len(train),
                "train_normal": train_normal,
                "train_anomalous": train_anomalous,
                "anomalous_unique": len(set(anomalous)),
                "anomalous_pool": len(split.pool),
                "max_repeats": max((anomalous.count(a) for a in set(anomalous)), default=0),
                "val_normal": entry_counts(validation)[0],
                "val_anomalous": entry_counts(validation)[1],
                "test_normal": entry_counts(test)[0],
                "test_anomalous": entry_counts(test)[1],
                "datalist": filename,
            }
        )
    return rows, datalists


def main(
    root: str,
    out: str,
    ratios: Any = DEFAULT_RATIOS,
    size: int = 256,
    seed: int = 0,
    categories: Any = None,
    exclude: Any = EXCLUDED,
    n_val: int = 5,
    val_anomalous: int = 3,
    n_test: int = 20,
    test_anomalous: int = 10,
    train_size: int | None = None,
    oversample: bool = True,
    copy: bool = False,
) -> list[dict]:
    """Prepares MVTec AD datalists for ILTM; see the module docstring and docs/paper_datasets.md.

    Args:
        root: the MVTec AD folder (holding `<category>/train`, `test`, `ground_truth`); pass it as `--dataset_dir`.
        out: output folder for the datalists, summary, zero masks (and copies).
        ratios: anomalous fractions of the training sets, "0,0.2,0.4" or a list.
        size: side of the copied images and masks (only with `copy`; otherwise the preset's `image_size`).
        seed: fixes the validation/test split and the training draws.
        categories: only these categories (default: every folder in `root`).
        exclude: categories left out (default: toothbrush, transistor, as in the paper); "" for none.
        n_val: validation images per category (the normal ones from test/good).
        val_anomalous: how many of the validation images are anomalous.
        n_test: test images per category (the normal ones from test/good).
        test_anomalous: how many of the test images are anomalous.
        train_size: training images per category (default: the category's number of train/good images).
        oversample: repeat anomalous images when the pool is smaller than a ratio needs (False: error instead).
        copy: also write images and masks resized to `size` under `out/images`; paths then relative to `out`.
    Returns:
        The summary rows (one per category and ratio).
    """
    ratios = parse_ratios(ratios)
    out = os.path.abspath(out)
    root = os.path.abspath(root)
    names = find_categories(root, parse_names(categories), parse_names(exclude), out)
    os.makedirs(out, exist_ok=True)
    writer = MaskWriter(root, out, bool(copy), int(size))
    splits = {
        "n_val": int(n_val),
        "val_anomalous": int(val_anomalous),
        "n_test": int(n_test),
        "test_anomalous": int(test_anomalous),
    }
    # copies of another size, or paths relative to another base, would replace or mix with the datalists already there
    protocol = {
        "dataset": "mvtec",
        "seed": int(seed),
        **splits,
        "copy": bool(copy),
        "size": int(size) if copy else None,
    }
    check_protocol(out, protocol)
    _check_older_copies(out, protocol)
    rows = []
    for name in names:
        found, datalists = prepare_category(root, out, name, ratios, int(seed), splits, writer, train_size,
                                            bool(oversample))  # fmt: skip
        write_json(os.path.join(out, "protocol.json"), protocol)  # before any datalist: a later failure binds them
        for filename, datalist in datalists.items():
            write_json(os.path.join(out, filename), datalist)
        rows += found
        table = write_summary(out, found, f"MVTec AD datalists (seed {seed})", protocol)  # after each category
    print(table)
    base = "the output folder" if copy else "the MVTec AD root"
    print(f"\n{len(rows)} datalists written in {out} (its summary.md lists every one there); image paths are "
          f"relative to {base}: pass it as --dataset_dir.")  # fmt: skip
    if int(size) != 256:  # the preset's image_size would resize them to 256 (copies of another size too)
        print(f'For images of {size} px: add --image_size "[{size}, {size}]" to the training command (configs/mvtec.yaml '
              "resizes to 256).")  # fmt: skip
    return rows


if __name__ == "__main__":
    fire_main(main, serialize=lambda rows: None)  # the summary is printed already
