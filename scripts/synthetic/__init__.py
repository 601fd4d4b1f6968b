"""Embedded synthetic datasets: the bundle's default data when the user brings none.

Both sets are contaminated the way real training data is: a chosen fraction of the training and validation images
is anomalous, and most anomalies are re-used prototypes (a production line repeats its defects, lesions recur at
the same anatomical sites with a similar look). That recurrence is what lets a plain VQ-VAE + Transformer learn
anomalies as normal, the failure ILTM exists to fix.

- 2D "inspection": crops of scikit-image's bundled textures (no download) with scratches, blobs, foreign-texture
  patches and intensity shifts; 8-bit grey PNG, 0-255. Mask = the support of the defect's blending weight: every
  pixel outside it is bit-identical to the defect-free image.
- 3D "whole-body PET-like": a body phantom in SUV units with hot ellipsoidal lesions; NIfTI float32 (RAS, mm).
  Mask = the lesion's support on the voxel grid before noise and smoothing (smoothing spills a few voxels beyond).

Everything is a pure function of the seed: each image has its own random stream (seed, split, index), the
prototype bank its own (seed, category), and files are written without timestamps, so the same seed gives the
same bytes.

Modules: :mod:`~scripts.synthetic.inspection` (2D), :mod:`~scripts.synthetic.pet` (3D), :mod:`~scripts.synthetic.common`
(random streams, writer, previews); this one: :func:`ensure_dataset`, the entry point the configs call.
CLI: ``python -m scripts.synthetic make_2d --out_dir data/x --anomalous_fraction 0.4`` (also make_3d,
ensure_dataset).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

from scripts.synthetic.common import NON_DATA_PARAMS, as_tuple
from scripts.synthetic.inspection import TEXTURES, make_2d, prototype_bank_2d, sample_2d, texture
from scripts.synthetic.pet import affine_3d, make_3d, prototype_bank_3d, sample_3d

__all__ = ["TEXTURES", "affine_3d", "ensure_dataset", "make_2d", "make_3d", "prototype_bank_2d", "prototype_bank_3d",
           "sample_2d", "sample_3d", "texture"]  # fmt: skip
logger = logging.getLogger(__name__)


def ensure_dataset(dataset_dir: str, kind: str = "2d", **params: Any) -> str:
    """Datalist path of `dataset_dir`, generating the synthetic set first if the folder holds none.

    Generation goes to a temporary sibling renamed into place, so an interrupted run never leaves a folder that
    looks complete; concurrent callers (e.g. one per GPU) all end up with the one that won the rename.
    """
    makers = {"2d": make_2d, "3d": make_3d}
    if kind not in makers:
        raise ValueError(f"kind must be one of {sorted(makers)}, got {kind!r}")
    datalist = os.path.join(dataset_dir, "datalist.json")
    if os.path.isfile(datalist):
        _check_params(dataset_dir, kind, params)
        return datalist
    if os.path.isdir(dataset_dir) and os.listdir(dataset_dir):
        if os.path.isfile(datalist):  # a concurrent caller renamed its complete folder into place meanwhile
            _check_params(dataset_dir, kind, params)
            return datalist
        raise FileExistsError(
            f"{dataset_dir}: the folder has files but no datalist.json. For your own images, write a MONAI datalist "
            '(docs/README.md, "Your own data") and pass it with --datalist; for the embedded synthetic set, point '
            "--dataset_dir at a new or empty folder."
        )
    logger.warning(
        f"{dataset_dir}: no datalist.json there, so the embedded synthetic {kind} set is generated into it (the demo "
        'data); your own images need a datalist (docs/README.md, "Your own data").'
    )
    parent = os.path.dirname(os.path.abspath(dataset_dir))
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(os.path.abspath(dataset_dir))}.tmp-"
    for stale in glob.glob(os.path.join(parent, prefix + "*")):  # left by a generation killed over an hour ago
        if time.time() - os.path.getmtime(stale) > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        makers[kind](tmp, **params)
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; a dataset folder is not private
            os.rename(tmp, dataset_dir)  # atomic; replaces an empty folder on POSIX
        except OSError:
            if not os.path.isfile(datalist):  # not a concurrent winner: a real failure
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    _check_params(dataset_dir, kind, params)
    return datalist


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_params(dataset_dir: str, kind: str, params: dict[str, Any]) -> None:
    """Explicit params must match what generated the folder; a user's own data (no params.json) is not checked."""
    path = os.path.join(dataset_dir, "params.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        recorded = json.load(f)
    wanted = {"kind": kind, **{k: v for k, v in params.items() if k not in NON_DATA_PARAMS}}
    if "categories" in wanted:
        wanted["categories"] = as_tuple(wanted["categories"], str)
    for key in ("grid", "fov_mm"):
        if key in wanted:
            wanted[key] = as_tuple(wanted[key], float)
    conflicts = []
    for key, value in wanted.items():
        have = recorded.get(key, "<not recorded>")
        if json.loads(json.dumps(value)) != have:
            conflicts.append(f"{key}={value!r} (folder has {have!r})")
    if conflicts:
        raise ValueError(
            f"{dataset_dir}: existing synthetic dataset was generated with other parameters: {', '.join(conflicts)}. "
            "Delete the folder to regenerate it, or use another dataset_dir."
        )
