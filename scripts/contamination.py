"""The contamination protocol's shared helpers: ratios, sampling, leakage checks, datalists and summaries.

Used by :mod:`scripts.prepare_mvtec` and :mod:`scripts.prepare_autopet` (Patel et al., ICCV Workshops 2023, §3.3).
"""

from __future__ import annotations

import csv
import json
import math
import os
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import numpy as np

from scripts.cli import as_list
from scripts.files import write_json

T = TypeVar("T")


class LayoutError(ValueError):
    """The folder does not have the layout the preparation expects; the message names the missing path."""


def parse_ratios(value: Any) -> tuple[float, ...]:
    """Anomalous fractions from what fire passes ("0,0.2", (0, 0.2), 0.4) or a list; sorted, unique, in [0, 1]."""
    ratios = sorted({float(v) for v in as_list(value)})
    if not ratios:
        raise ValueError("no anomalous ratio given (e.g. --ratios 0,0.2,0.4)")
    bad = [r for r in ratios if not 0.0 <= r <= 1.0]
    if bad:
        raise ValueError(f"anomalous ratios must be in [0, 1], got {bad}")
    tags = [ratio_tag(r) for r in ratios]
    same = sorted({f"{r:g}" for r, tag in zip(ratios, tags) if tags.count(tag) > 1})
    if same:
        raise ValueError(f"anomalous ratios {', '.join(same)} share a file name at two decimals; give them apart")
    return tuple(ratios)


def parse_names(value: Any) -> tuple[str, ...]:
    """Names from "a,b", ("a", "b"), "a" or None/"" (none)."""
    return tuple(str(v).strip() for v in as_list(value) if str(v).strip())


def ratio_tag(ratio: float) -> str:
    """File-name tag of a ratio, 2 decimals: 0.4 -> "r0.40", 1 -> "r1.00"."""
    return f"r{ratio:.2f}"


def count_at_ratio(total: int, ratio: float) -> int:
    """Number of anomalous entries in a set of `total` at `ratio`: nearest integer, halves rounded up."""
    return int(math.floor(total * ratio + 0.5 + 1e-9))


def rng(seed: int, *keys: str) -> np.random.Generator:
    """An independent stream per (seed, keys); strings hashed with crc32, stable across runs and machines."""
    return np.random.default_rng([int(seed)] + [zlib.crc32(k.encode()) for k in keys])


def draw(pool: Sequence[T], n: int, generator: np.random.Generator, what: str, oversample: bool = True) -> list[T]:
    """`n` items of `pool`: without replacement when the pool is big enough, else over-sampled evenly.

    Items are taken from a concatenation of random permutations of the pool, so over-sampling repeats every item
    floor(n / len(pool)) or ceil(n / len(pool)) times (never one item many times and another never), and, because a
    fresh generator with the same seed gives the same sequence, the draw for a smaller `n` is a prefix of the draw
    for a larger one: training sets at increasing ratios share their anomalous images.
    """
    if n <= 0:
        return []
    if not pool:
        raise LayoutError(f"{what}: {n} needed but none available")
    if n > len(pool) and not oversample:
        raise LayoutError(
            f"{what}: {n} needed but only {len(pool)} available and over-sampling is disabled "
            "(--oversample True repeats images; or ask for fewer: --train_size of prepare_mvtec or --n_train of "
            "prepare_autopet, or lower --ratios)"
        )
    order: list[int] = []
    while len(order) < n:
        order.extend(generator.permutation(len(pool)).tolist())
    return [pool[i] for i in order[:n]]


def check_no_leakage(datalist: dict, name: str, key: str = "image") -> None:
    """Raises AssertionError when a validation or test item also appears in training, or in both evaluation sets.

    An explicit raise rather than `assert`, so that `python -O` cannot switch the check off.
    """
    sets = {s: {e[key] for e in datalist.get(s, [])} for s in ("training", "validation", "test")}
    for a, b in (("training", "validation"), ("training", "test"), ("validation", "test")):
        shared = sets[a] & sets[b]
        if shared:
            raise AssertionError(f"{name}: {len(shared)} {key}(s) in both {a} and {b}, e.g. {sorted(shared)[0]}")


def check_protocol(out: str, protocol: dict[str, Any]) -> None:
    """The evaluation draw (seed, split sizes) of the datalists already in `out` (`protocol.json`, written with the
    summary, and by scripts.prepare_mvtec before its first datalist) must be this run's: another would put one
    preparation's test images in another's training sets beside them. More ratios or categories, or other
    training-pool options, may be added later. A setting an older preparation did not record is not compared."""
    path = os.path.join(out, "protocol.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        recorded = json.load(f)
    differ = [f"{k}: {recorded[k]!r} there, {v!r} now" for k, v in protocol.items() if recorded.get(k, v) != v]
    if differ:
        raise LayoutError(f"{out}: holds datalists drawn with other settings ({'; '.join(differ)}); use another --out")


def write_summary(out: str, rows: Sequence[dict], title: str, protocol: dict[str, Any]) -> str:
    """Writes `summary.csv`, `summary.md` and the evaluation draw `protocol.json` (see :func:`check_protocol`) in
    `out`, once the datalists are written; returns the Markdown table (for printing). The rows of datalists an
    earlier preparation left in `out` (more ratios or categories) are kept, so that the summary lists every one."""
    write_json(os.path.join(out, "protocol.json"), protocol)
    columns, path = list(rows[0]), os.path.join(out, "summary.csv")
    if os.path.isfile(path):
        new = {row["datalist"] for row in rows}
        with open(path, newline="") as f:  # the earlier rows whose datalists are still there and not drawn again
            kept = [row for row in csv.DictReader(f) if row.get("datalist") not in new
                    and os.path.isfile(os.path.join(out, row.get("datalist") or ""))]  # fmt: skip
        rows = sorted([*kept, *rows], key=lambda row: (str(row.get("category")), str(row["datalist"])))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"| {' | '.join(columns)} |", f"|{'|'.join('---' for _ in columns)}|"]
    lines += [f"| {' | '.join(str(row.get(c, '')) for c in columns)} |" for row in rows]
    table = "\n".join(lines)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# {title}\n\n{table}\n")
    return table


def entry_counts(entries: Iterable[dict]) -> tuple[int, int]:
    """(normal, anomalous) entries of a section."""
    flags = [e["anomalous"] for e in entries]
    return flags.count(0), flags.count(1)
