"""What both synthetic generators share: reproducible random streams, the dataset writer and preview figures."""

from __future__ import annotations

import os
import zlib
from typing import Any

import numpy as np
from tqdm import tqdm

from scripts.cli import as_list
from scripts.files import write_json

SPLITS = {"training": "train", "validation": "val", "test": "test"}  # datalist section -> file prefix
NON_DATA_PARAMS = ("preview", "progress")  # change no image; ensure_dataset does not compare them


def stream(seed: int, *keys: int | str) -> np.random.Generator:
    """Independent, reproducible stream per (seed, keys); strings are hashed stably (not with hash())."""
    ints = [int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(ints)


def _fraction_count(n: int, fraction: float) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"anomalous fraction must be in [0, 1], got {fraction}")
    return int(round(n * fraction))


def _anomalous_flags(n: int, fraction: float, seed: int, split: str) -> np.ndarray:
    """Exactly round(n * fraction) anomalous entries, at random positions in the split."""
    flags = np.zeros(n, dtype=bool)
    flags[stream(seed, "assign", split).permutation(n)[: _fraction_count(n, fraction)]] = True
    return flags


def as_tuple(value: Any, cast: type) -> tuple:
    """Fire passes "a,b" or a bare "a"; configs pass lists."""
    return tuple(cast(v.strip() if isinstance(v, str) else v) for v in as_list(value))


def write_dataset(out_dir, params, counts, fractions, sample, ext, save, make_preview, progress) -> str:
    """Images, labels, datalist.json (paths relative to out_dir), anomalies.json, params.json, preview.png."""
    for section, fraction in fractions.items():  # before any folder is made
        _fraction_count(counts[section], fraction)
    if os.path.isfile(os.path.join(out_dir, "datalist.json")):  # a smaller set would leave the old images beside it
        raise FileExistsError(
            f"{out_dir} already holds a generated dataset (datalist.json); generate into a new or empty folder, or "
            "delete this one first"
        )
    for key in ("images", "labels"):
        os.makedirs(os.path.join(out_dir, key), exist_ok=True)
    datalist: dict[str, list[dict]] = {}
    anomalies: dict[str, list[dict]] = {}
    shown: list[tuple[np.ndarray, np.ndarray]] = []
    with tqdm(total=sum(counts.values()), desc=f"synthetic {params['kind']}", disable=tqdm_disable(progress)) as bar:
        for section, prefix in SPLITS.items():
            seed_split = section  # the random streams are keyed by the section name
            flags = _anomalous_flags(counts[section], fractions[section], params["seed"], seed_split)
            datalist[section], anomalies[section] = [], []
            for idx, flag in enumerate(flags):
                image, label, info = sample(seed_split, idx, bool(flag))
                name = f"{prefix}_{idx:04d}{ext}"
                save(os.path.join(out_dir, "images", name), image)
                save(os.path.join(out_dir, "labels", name), label)
                datalist[section].append(
                    {"image": f"images/{name}", "label": f"labels/{name}", "category": info.pop("category"),
                     "anomalous": int(flag)}
                )  # fmt: skip
                anomalies[section].append({"image": f"images/{name}", **info})
                if section == "training" and len(shown) < 8:
                    shown.append((image, label))
                bar.update()
    write_json(os.path.join(out_dir, "anomalies.json"), anomalies, indent=1)
    write_json(os.path.join(out_dir, "params.json"), {**params, "generator": "scripts.synthetic"}, indent=1)
    if params.get("preview") and shown:
        make_preview(os.path.join(out_dir, "preview.png"), shown)
    path = os.path.join(out_dir, "datalist.json")
    write_json(path, datalist, indent=1)  # written last: its presence marks a complete dataset
    return path


def tqdm_disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def preview_figure(n: int):
    from scripts.plots import figure

    fig = figure(figsize=(1.6 * n, 1.9 if n else 1), dpi=100)
    return fig, fig.subplots(1, n, squeeze=False)[0]


def save_figure(fig, path: str) -> None:
    fig.savefig(path, format="png", metadata={"Software": None})
