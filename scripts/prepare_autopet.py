"""autoPET (FDG-PET/CT lesions) datalists for ILTM's contamination protocol (Patel et al., ICCV Workshops 2023, §3.3).

The paper trains on whole-body FDG-PET with training sets of 425 subjects whose share of diseased subjects goes
from 0 to 100 %, and evaluates on 20 validation and 50 test subjects. Here a subject is diseased when the lesion
segmentation (SEG) of its study has any non-zero voxel, healthy when it is empty. The evaluation subjects are drawn
once (fixed by the seed, shared by every ratio); each training set then mixes healthy and diseased subjects from
the rest to its ratio, over-sampling a pool that is too small (as MVTec does; ``oversample=False`` makes that an
error that states the counts).

Reads the public NIfTI release: ``<root>/PETCT_<subject>/<study>/`` with ``SUV.nii.gz``, ``CTres.nii.gz`` and
``SEG.nii.gz`` (``PET.nii.gz`` and ``CT.nii.gz`` are not needed). Study folders are named by date
(``08-12-2005-NA-PET-CT Ganzkoerper  primaer mit KM-10445``); one study per subject is used, the first by date
unless ``study="last"``; ``all_training_studies=True`` puts every study of a training subject in the pools.

Nothing is copied or resampled: datalist paths are relative to the autoPET root (pass it as ``--dataset_dir``), and
intensity and spatial preprocessing are MONAI transforms in ``configs/autopet.yaml``. Only the lesion-voxel count of
each SEG is kept, in a small cache in the output folder, so that a rerun (another seed or ratio) reads no volume.

CLI::

    python -m scripts.prepare_autopet --root AUTOPET_DIR --out OUT_DIR [--ratios 0,0.2,0.4,0.6,0.8,1.0] [--seed 0]

writes ``OUT_DIR/datalist_autopet_r<ratio, 2 decimals>.json``, ``summary.csv`` / ``summary.md`` and
``subjects.csv`` (every subject's study, status and split).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from scripts.cli import fire_main
from scripts.contamination import (
    LayoutError,
    check_no_leakage,
    check_protocol,
    count_at_ratio,
    draw,
    parse_names,
    parse_ratios,
    ratio_tag,
    rng,
    write_summary,
)
from scripts.data import listing
from scripts.files import write_json

logger = logging.getLogger(__name__)
DEFAULT_RATIOS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
REQUIRED = ("SUV.nii.gz", "CTres.nii.gz", "SEG.nii.gz")
SUBJECT_PREFIX = "PETCT_"
CATEGORY = "autopet"
CACHE = "seg_cache.json"
DATE = re.compile(r"^(\d{2})-(\d{2})-(\d{4})")  # study folders start with MM-DD-YYYY


@dataclass(frozen=True)
class Study:
    """One PET/CT study; `folder` is `PETCT_<subject>/<study>` relative to the root, forward slashes."""

    subject: str
    name: str
    lesion_voxels: int = -1  # -1 until the SEG is read

    @property
    def folder(self) -> str:
        return f"{self.subject}/{self.name}"

    @property
    def anomalous(self) -> int:
        return int(self.lesion_voxels > 0)

    def entry(self) -> dict:
        return {
            "image": f"{self.folder}/SUV.nii.gz",
            "label": f"{self.folder}/SEG.nii.gz",
            "ct": f"{self.folder}/CTres.nii.gz",
            "category": CATEGORY,
            "anomalous": self.anomalous,
            "subject": self.subject,
            "study": self.name,
            "lesion_voxels": self.lesion_voxels,
        }


def study_order(name: str) -> tuple:
    """Chronological order of study folders (MM-DD-YYYY prefix; as text, 08-12-2005 would sort after 01-03-2010);
    folders without a date come last, by name."""
    m = DATE.match(name)
    return (0, int(m[3]), int(m[1]), int(m[2]), name) if m else (1, 0, 0, 0, name)


def find_subjects(root: str) -> dict[str, list[str]]:
    """`PETCT_*` subject folders and their study folders, chronologically; errors name the folder at fault."""
    if not os.path.isdir(root):
        raise LayoutError(f"{root}: autoPET folder not found")
    subjects = sorted(d for d in os.listdir(root) if d.startswith(SUBJECT_PREFIX) and os.path.isdir(f"{root}/{d}"))
    if not subjects:
        nested = [
            d
            for d in sorted(os.listdir(root))
            if os.path.isdir(os.path.join(root, d))
            and any(s.startswith(SUBJECT_PREFIX) for s in os.listdir(os.path.join(root, d)))
        ]
        hint = f"; pass {os.path.join(root, nested[0])} as --root" if nested else ""
        raise LayoutError(
            f"{root}: no {SUBJECT_PREFIX}<subject> folders (expected <root>/PETCT_*/<study>/SUV.nii.gz){hint}"
        )
    studies = {}
    for subject in subjects:
        folder = os.path.join(root, subject)
        names = sorted((d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))), key=study_order)
        if not names:
            raise LayoutError(f"{folder}: no study folder (expected {subject}/<study>/SUV.nii.gz, SEG.nii.gz, ...)")
        studies[subject] = names
    return studies


def select_studies(studies: dict[str, list[str]], study: str) -> dict[str, str]:
    """The study that represents each subject: the first or the last by date."""
    if study not in ("first", "last"):
        raise ValueError(f"study must be 'first' or 'last', got {study!r}")
    undated = [f"{subject}/{n}" for subject, names in studies.items() if len(names) > 1 for n in names
               if not DATE.match(n)]  # fmt: skip
    if undated:
        logger.warning(f"{len(undated)} study folders of subjects with several studies do not start with a MM-DD-YYYY "
                       f"date, so they count as later than the dated ones (by name among themselves): "
                       f"{', '.join(undated[:5])}{', ...' if len(undated) > 5 else ''}")  # fmt: skip
    return {subject: names[0 if study == "first" else -1] for subject, names in studies.items()}


def check_files(root: str, folders: Sequence[str], required: Sequence[str]) -> None:
    """Every needed file of every used study exists; the error names every one missing, to fix in one pass."""
    paths = [os.path.join(root, *folder.split("/"), name) for folder in folders for name in required]
    missing = [path for path in paths if not os.path.isfile(path)]
    needs = f"each study folder needs {', '.join(required)}"
    if len(missing) == 1:
        raise LayoutError(f"{missing[0]}: not found ({needs})")
    if missing:
        raise LayoutError(f"{len(missing)} files not found ({needs}):{listing(missing)}")


def count_lesion_voxels(path: str) -> int:
    """Non-zero voxels of a segmentation, from its data array (the header says nothing about emptiness), after
    checking that it has the shape of the study's SUV (its header only), which it labels."""
    try:
        seg = nib.load(path)
        image = os.path.join(os.path.dirname(path), "SUV.nii.gz")
        shape = nib.load(image).shape if os.path.isfile(image) else seg.shape
        count = int(np.count_nonzero(np.asanyarray(seg.dataobj)))
    except Exception as e:  # noqa: BLE001 - any read failure is this file's
        raise LayoutError(f"{path}: cannot be read as NIfTI ({type(e).__name__}: {e})") from e
    if seg.shape != shape:
        raise LayoutError(f"{path}: shape {seg.shape} differs from SUV.nii.gz's {shape}, the image it labels")
    return count


def read_status(root: str, out: str, folders: Sequence[str], workers: int) -> dict[str, int]:
    """Lesion-voxel count of each study's SEG, read in threads (decompression releases the GIL).

    Counts are cached in `out/seg_cache.json` by file size and modification time: only a changed or new SEG is
    read again. Nothing else is kept, so memory holds at most `workers` volumes at once.
    """
    cache_path = os.path.join(out, CACHE)
    cache: dict[str, list[int]] = {}
    if os.path.isfile(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)

    def stamp(folder: str) -> list[int]:
        st = os.stat(os.path.join(root, *folder.split("/"), "SEG.nii.gz"))
        return [st.st_size, st.st_mtime_ns]

    stamps = {folder: stamp(folder) for folder in folders}
    todo = [f for f in folders if f not in cache or cache[f][:2] != stamps[f]]
    paths = [os.path.join(root, *f.split("/"), "SEG.nii.gz") for f in todo]

    def attempt(path: str) -> int | LayoutError:
        try:
            return count_lesion_voxels(path)
        except LayoutError as e:
            return e

    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        counts = list(tqdm(pool.map(attempt, paths), total=len(paths), desc="reading SEG", leave=False))
    errors = [str(c) for c in counts if isinstance(c, LayoutError)]  # every bad SEG at once
    if errors:
        raise LayoutError(
            errors[0] if len(errors) == 1 else f"{len(errors)} SEG files cannot be used:{listing(errors)}"
        )
    for folder, count in zip(todo, counts):
        cache[folder] = [*stamps[folder], count]
    if todo:
        write_json(cache_path, dict(sorted(cache.items())))
    return {folder: cache[folder][2] for folder in folders}


@dataclass
class Split:
    """Evaluation subjects (one study each) and the training pools of the other subjects."""

    validation: list[Study]
    test: list[Study]
    healthy_pool: list[Study]
    diseased_pool: list[Study]


def split_subjects(
    chosen: Sequence[Study], n_val: int, val_anomalous: int, n_test: int, test_anomalous: int, seed: int
) -> tuple[list[Study], list[Study]]:
    """Validation and test subjects, each set with its number of diseased subjects, drawn with the seed."""
    if not (0 <= val_anomalous <= n_val and 0 <= test_anomalous <= n_test):
        raise ValueError(
            f"diseased counts must be within the set sizes: validation {val_anomalous}/{n_val}, "
            f"test {test_anomalous}/{n_test}"
        )
    by_status = {}
    for status, label in ((1, "diseased"), (0, "healthy")):
        group = [s for s in chosen if s.anomalous == status]
        by_status[status] = [group[i] for i in rng(seed, CATEGORY, label).permutation(len(group))]
        need_test = test_anomalous if status else n_test - test_anomalous
        need_val = val_anomalous if status else n_val - val_anomalous
        if len(group) < need_test + need_val:
            raise LayoutError(
                f"{len(group)} {label} subjects, {need_test} (test) + {need_val} (validation) needed; "
                f"lower --n_test/--n_val or the diseased counts"
            )
    diseased, healthy = by_status[1], by_status[0]
    n_test_healthy, n_val_healthy = n_test - test_anomalous, n_val - val_anomalous
    test = healthy[:n_test_healthy] + diseased[:test_anomalous]
    validation = healthy[n_test_healthy : n_test_healthy + n_val_healthy]
    validation += diseased[test_anomalous : test_anomalous + val_anomalous]
    return validation, test


def training_set(split: Split, n_train: int, ratio: float, seed: int, oversample: bool) -> list[Study]:
    """`n_train` studies, `count_at_ratio(n_train, ratio)` of them diseased; nested across ratios (see `draw`)."""
    n_diseased = count_at_ratio(n_train, ratio)
    healthy = draw(
        split.healthy_pool,
        n_train - n_diseased,
        rng(seed, CATEGORY, "train healthy"),
        "healthy training subjects (those not in validation or test)",
        oversample,
    )
    diseased = draw(
        split.diseased_pool,
        n_diseased,
        rng(seed, CATEGORY, "train diseased"),
        "diseased training subjects (those not in validation or test)",
        oversample,
    )
    return healthy + diseased


def _write_subjects(out: str, studies: Sequence[Study], split: Split) -> None:
    """`subjects.csv`: every used study with its status and role, for auditing the protocol."""
    role = {s.folder: "test" for s in split.test}
    role.update({s.folder: "validation" for s in split.validation})
    with open(os.path.join(out, "subjects.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "study", "lesion_voxels", "diseased", "split"])
        for s in sorted(studies, key=lambda s: s.folder):
            writer.writerow([s.subject, s.name, s.lesion_voxels, s.anomalous, role.get(s.folder, "training pool")])


def main(
    root: str,
    out: str,
    ratios: Any = DEFAULT_RATIOS,
    seed: int = 0,
    n_train: int = 425,
    n_val: int = 20,
    val_anomalous: int = 10,
    n_test: int = 50,
    test_anomalous: int = 25,
    study: str = "first",
    all_training_studies: bool = False,
    oversample: bool = True,
    required: Any = REQUIRED,
    workers: int = 4,
) -> list[dict]:
    """Prepares autoPET datalists for ILTM; see the module docstring and docs/paper_datasets.md.

    Args:
        root: the folder holding the `PETCT_*` subject folders; pass it as `--dataset_dir`.
        out: output folder for the datalists, summary, subjects.csv and the SEG cache.
        ratios: diseased fractions of the training sets, "0,0.2,1.0" or a list.
        seed: fixes the evaluation subjects and the training draws.
        n_train: training subjects per ratio (paper: 425).
        n_val: validation subjects (paper: 20).
        val_anomalous: how many of the validation subjects are diseased.
        n_test: test subjects (paper: 50).
        test_anomalous: how many of the test subjects are diseased.
        study: "first" or "last" study by date represents each subject.
        all_training_studies: the pools hold every study of the training subjects (more distinct diseased scans than
            one per subject, fewer repeats); evaluation subjects still count with one study.
        oversample: repeat pool subjects when a ratio needs more than the pool holds (False: error with the counts).
        required: files every used study folder must hold.
        workers: threads reading SEG volumes.
    Returns:
        The summary rows (one per ratio).
    """
    ratios, seed = parse_ratios(ratios), int(seed)
    root, out = os.path.abspath(root), os.path.abspath(out)
    required = tuple(dict.fromkeys((*parse_names(required), "SUV.nii.gz", "SEG.nii.gz")))  # image and label, always
    studies = find_subjects(root)
    chosen_names = select_studies(studies, study)
    used = {s: (names if all_training_studies else [chosen_names[s]]) for s, names in studies.items()}
    folders = [f"{s}/{name}" for s, names in used.items() for name in names]
    check_files(root, folders, required)
    os.makedirs(out, exist_ok=True)
    protocol = {"dataset": "autopet", "seed": seed, "n_val": int(n_val), "val_anomalous": int(val_anomalous),
                "n_test": int(n_test), "test_anomalous": int(test_anomalous), "study": study}  # fmt: skip
    check_protocol(out, protocol)
    voxels = read_status(root, out, folders, workers)
    chosen = [Study(s, name, voxels[f"{s}/{name}"]) for s, name in chosen_names.items()]
    validation, test = split_subjects(chosen, int(n_val), int(val_anomalous), int(n_test), int(test_anomalous), seed)
    held_out = {s.subject for s in validation + test}
    pool = [Study(s, name, voxels[f"{s}/{name}"]) for s, names in used.items() if s not in held_out for name in names]
    split = Split(validation, test, [s for s in pool if not s.anomalous], [s for s in pool if s.anomalous])
    _write_subjects(out, chosen if not all_training_studies else pool + validation + test, split)
    print(
        f"{len(studies)} subjects ({sum(s.anomalous for s in chosen)} diseased, "
        f"{sum(1 - s.anomalous for s in chosen)} healthy by their {study} study); training pools: "
        f"{len(split.healthy_pool)} healthy, {len(split.diseased_pool)} diseased studies"
    )
    rows = []
    for ratio in ratios:
        train = training_set(split, int(n_train), ratio, seed, bool(oversample))
        datalist = {
            "description": (
                f"autoPET, {ratio:.0%} diseased training subjects (ILTM contamination protocol, seed {seed}). "
                "Paths are relative to the autoPET root (the folder of the PETCT_* folders): pass it as --dataset_dir."
            ),
            "category": CATEGORY,
            "anomalous_ratio": ratio,
            "seed": seed,
            "training": [s.entry() for s in train],
            "validation": [s.entry() for s in validation],
            "test": [s.entry() for s in test],
        }
        filename = f"datalist_{CATEGORY}_{ratio_tag(ratio)}.json"
        check_no_leakage(datalist, filename, key="subject")
        write_json(os.path.join(out, filename), datalist)
        diseased = [s.folder for s in train if s.anomalous]
        healthy = [s.folder for s in train if not s.anomalous]
        rows.append(
            {
                "ratio": f"{ratio:.2f}",
                "train": len(train),
                "train_healthy": len(healthy),
                "train_diseased": len(diseased),
                "unique_healthy": len(set(healthy)),
                "unique_diseased": len(set(diseased)),
                "healthy_pool": len(split.healthy_pool),
                "diseased_pool": len(split.diseased_pool),
                "max_repeats": max(Counter(healthy + diseased).values(), default=0),
                "val_healthy": len(validation) - sum(s.anomalous for s in validation),
                "val_diseased": sum(s.anomalous for s in validation),
                "test_healthy": len(test) - sum(s.anomalous for s in test),
                "test_diseased": sum(s.anomalous for s in test),
                "datalist": filename,
            }
        )
    print(write_summary(out, rows, f"autoPET datalists (seed {seed})", protocol))
    if any(r["max_repeats"] > 1 for r in rows):
        print("Some training sets repeat subjects (max_repeats > 1): a pool was smaller than the ratio needs.")
    print(f"\n{len(rows)} datalists in {out}; image paths are relative to the autoPET root: pass it as --dataset_dir.")
    return rows


if __name__ == "__main__":
    fire_main(main, serialize=lambda rows: None)  # the summary is printed already
