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

CLI: ``python -m scripts.synthetic make_2d --out_dir data/x --anomalous_fraction 0.4`` (also make_3d,
ensure_dataset).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from scripts.cli import as_list
from scripts.files import write_json

SPLITS = {"training": "train", "validation": "val", "test": "test"}  # datalist section -> file prefix
TEXTURES = ("brick", "grass", "gravel")  # the textures scikit-image ships inside its package (no pooch download)
# Upsampling that keeps the textures learnable at 4x downsampling: 4x4 patches of 64-px crops quantised by k-means
# with 256 codes reach L1 ~0.016 (brick), 0.021 (gravel), 0.024 (grass) of the 0-255 range.
TEXTURE_ZOOM = {"brick": 1.0, "grass": 2.5, "gravel": 2.0}
DEFECT_KINDS = ("scratch", "blob", "patch", "shift")
NON_DATA_PARAMS = ("preview", "progress")  # change no image; ensure_dataset does not compare them
ALPHA_CUTOFF = 0.15  # blending weights below this are dropped, so the mask covers only visibly altered pixels


def _rng(seed: int, *keys: int | str) -> np.random.Generator:
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
    flags[_rng(seed, "assign", split).permutation(n)[: _fraction_count(n, fraction)]] = True
    return flags


def _as_tuple(value: Any, cast: type) -> tuple:
    """Fire passes "a,b" or a bare "a"; configs pass lists."""
    return tuple(cast(v.strip() if isinstance(v, str) else v) for v in as_list(value))


# ----------------------------------------------------------------------------------------------------------- 2D


@dataclass(frozen=True)
class Defect:
    """One 2D defect, in pixels. `level` is a grey value, except for "shift" where it is the added offset."""

    kind: str
    center: tuple[float, float]  # (row, col)
    size: float  # length of a scratch, major diameter otherwise
    aspect: float  # minor/major axis; for a scratch the bend (control-point offset / length)
    angle: float  # radians
    level: float
    opacity: float
    width: float  # scratch line width; patch texture contrast (std)
    source: tuple[int, int] = (0, 0)  # patch: top-left of the foreign-texture crop
    prototype: int = -1  # index in the dataset's bank; -1 = one-off


@lru_cache(maxsize=None)
def texture(category: str, zoom: float | None = None) -> np.ndarray:
    """Bundled skimage texture, rescaled by `zoom` and stretched to grey levels ~35-215 (headroom for defects)."""
    if category not in TEXTURES:
        raise ValueError(f"unknown category {category!r}; available: {', '.join(TEXTURES)}")
    import skimage.data
    from skimage.transform import rescale

    img = getattr(skimage.data, category)().astype(np.float64)
    zoom = TEXTURE_ZOOM[category] if zoom is None else float(zoom)
    if zoom != 1.0:
        img = rescale(img, zoom, order=1, anti_aliasing=zoom < 1, preserve_range=True)
    lo, hi = np.percentile(img, (1, 99))
    img = (img - lo) / (hi - lo) * 180.0 + 35.0
    img.setflags(write=False)
    return img


def _crop(tex: np.ndarray, size: int, top: int, left: int) -> np.ndarray:
    if min(tex.shape) < size + 1:  # image larger than the texture: mirror-tile it
        reps = size // min(tex.shape) + 1
        tex = np.pad(tex, ((0, reps * tex.shape[0]), (0, reps * tex.shape[1])), mode="symmetric")
    top, left = top % (tex.shape[0] - size), left % (tex.shape[1] - size)
    return tex[top : top + size, left : left + size]


def _random_defect(rng: np.random.Generator, kind: str, image_size: int, foreign_size: int) -> Defect:
    """Sizes scale with the image: 3-24 px at 64 px, i.e. about one to a few tokens at 4x downsampling."""
    s = image_size / 64.0
    dark = rng.random() < 0.5
    grey = rng.uniform(10, 50) if dark else rng.uniform(205, 250)
    angle = rng.uniform(0, np.pi)
    if kind == "scratch":
        size, aspect, width = rng.uniform(10, 24) * s, rng.uniform(-0.35, 0.35), rng.uniform(1.0, 2.0) * s
        level, opacity = grey, rng.uniform(0.7, 1.0)
    elif kind == "blob":
        size, aspect, width = rng.uniform(4, 14) * s, rng.uniform(0.4, 1.0), 0.0
        level, opacity = grey, rng.uniform(0.6, 1.0)
    elif kind == "patch":
        size, aspect, width = rng.uniform(6, 15) * s, rng.uniform(0.5, 1.0), rng.uniform(20, 45)
        level, opacity = rng.uniform(60, 200), rng.uniform(0.85, 1.0)
    elif kind == "shift":
        size, aspect, width = rng.uniform(6, 15) * s, rng.uniform(0.5, 1.0), 0.0
        level, opacity = (-1 if dark else 1) * rng.uniform(30, 70), 1.0
    else:
        raise ValueError(f"unknown defect kind {kind!r}")
    margin = min(size / 2, image_size / 4)
    center = tuple(float(c) for c in rng.uniform(margin, image_size - margin, 2))
    source = tuple(int(v) for v in rng.integers(0, max(foreign_size - image_size, 1), 2))
    return Defect(
        kind, center, float(size), float(aspect), float(angle), float(level), float(opacity), float(width), source
    )


def prototype_bank_2d(seed: int, category: str, image_size: int, n_prototypes: int = 4) -> list[Defect]:
    """The dataset's recurring defects: fixed by (seed, category), shared by all splits, one kind after another."""
    rng = _rng(seed, "bank2d", category)
    kinds = [DEFECT_KINDS[i] for i in rng.permutation(len(DEFECT_KINDS))]
    foreign = texture(_foreign(category)).shape[0]
    bank = [_random_defect(rng, kinds[i % len(kinds)], image_size, foreign) for i in range(n_prototypes)]
    return [replace(d, prototype=i) for i, d in enumerate(bank)]


def _foreign(category: str) -> str:
    return TEXTURES[(TEXTURES.index(category) + 2) % len(TEXTURES)]


def _jitter(rng: np.random.Generator, proto: Defect, image_size: int, position_jitter: float = 0.1) -> Defect:
    """A re-use of a prototype: same kind, look and orientation; small shifts in scale, angle and level, and a shift
    in position of up to `position_jitter` of the image size (0.5 and above: anywhere in the image)."""
    margin = min(proto.size / 2, image_size / 4)
    shift = rng.uniform(-position_jitter, position_jitter, 2) * image_size
    center = _reflect(np.array(proto.center) + shift, margin, image_size - margin)
    level = proto.level * rng.uniform(0.9, 1.1) if proto.kind == "shift" else proto.level + rng.uniform(-8, 8)
    return replace(
        proto,
        center=(float(center[0]), float(center[1])),
        size=proto.size * rng.uniform(0.9, 1.1),
        angle=proto.angle + rng.uniform(-0.17, 0.17),
        level=float(level),
        opacity=float(min(1.0, proto.opacity * rng.uniform(0.95, 1.05))),
        width=proto.width * rng.uniform(0.9, 1.1),
        source=tuple(int(v) for v in np.array(proto.source) + rng.integers(-3, 4, 2)),
    )


def _reflect(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold values into [lo, hi] by reflection at the bounds, so large shifts stay uniform instead of piling up."""
    span = max(hi - lo, 1e-9)
    folded = np.mod(x - lo, 2 * span)
    return lo + np.where(folded > span, 2 * span - folded, folded)


def _alpha(d: Defect, image_size: int) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Blending weight of a defect on its bounding box (soft 1-px edges, cut off below ALPHA_CUTOFF)."""
    half = d.size / 2 + d.width + 2
    r0, r1 = max(int(d.center[0] - half), 0), min(int(np.ceil(d.center[0] + half)) + 1, image_size)
    c0, c1 = max(int(d.center[1] - half), 0), min(int(np.ceil(d.center[1] + half)) + 1, image_size)
    box = (slice(r0, r1), slice(c0, c1))
    rr, cc = np.meshgrid(np.arange(r0, r1, dtype=float), np.arange(c0, c1, dtype=float), indexing="ij")
    dy, dx = rr - d.center[0], cc - d.center[1]
    cos, sin = np.cos(d.angle), np.sin(d.angle)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos  # along / across the defect's major axis
    if d.kind == "scratch":  # quadratic Bezier from -L/2 to +L/2 along u, bent across by aspect * L
        t = np.linspace(0, 1, int(2 * d.size) + 3)
        pu = (t - 0.5) * d.size
        pv = 2 * t * (1 - t) * d.aspect * d.size
        dist = np.sqrt((u[..., None] - pu) ** 2 + (v[..., None] - pv) ** 2).min(-1)
        alpha = np.clip(d.width / 2 + 0.5 - dist, 0, 1)
    else:
        a, b = d.size / 2, max(d.size / 2 * d.aspect, 0.75)
        power = 4 if d.kind == "patch" else 2  # patches are rounded rectangles, the rest ellipses
        r = (np.abs(u / a) ** power + np.abs(v / b) ** power) ** (1 / power)
        alpha = np.clip(1 - r**2, 0, 1) if d.kind == "shift" else np.clip(0.5 - (r - 1) * b, 0, 1)
    alpha = alpha * d.opacity
    alpha[alpha < ALPHA_CUTOFF] = 0
    return alpha, box


def apply_defect(image: np.ndarray, d: Defect, category: str) -> tuple[np.ndarray, np.ndarray]:
    """Composite one defect onto a float image; returns (image, support) - nothing outside `support` changes."""
    out, support = image.copy(), np.zeros(image.shape, dtype=bool)
    alpha, box = _alpha(d, image.shape[0])
    region = out[box]
    if d.kind == "shift":
        region += d.level * alpha
    else:
        if d.kind == "patch":
            h, w = region.shape
            tex = _crop(texture(_foreign(category)), max(h, w), *d.source)[:h, :w]
            value = (tex - tex.mean()) / (tex.std() + 1e-6) * d.width + d.level
        else:
            value = d.level
        region *= 1 - alpha
        region += value * alpha
    support[box] = alpha > 0
    return out, support


def normal_2d(seed: int, split: str, idx: int, category: str, image_size: int, zoom: float | None = None) -> np.ndarray:
    """Defect-free image: random crop, one of 8 flips/rotations, mild brightness jitter."""
    rng = _rng(seed, "normal", split, idx)
    tex = texture(category, zoom)
    top, left = (int(v) for v in rng.integers(0, max(min(tex.shape) - image_size, 1), 2))
    img = _crop(tex, image_size, top, left)
    k = int(rng.integers(8))
    img = np.rot90(img, k % 4)
    img = img[:, ::-1] if k >= 4 else img
    img = img * rng.uniform(0.92, 1.08) + rng.uniform(-6, 6)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def sample_2d(
    seed: int,
    split: str,
    idx: int,
    anomalous: bool,
    category: str = "brick",
    image_size: int = 64,
    recurrence: float = 0.8,
    bank: Sequence[Defect] | None = None,
    zoom: float | None = None,
    position_jitter: float = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Defect]]:
    """(normal, image, mask, defects) for one entry; image equals normal exactly outside mask.

    `split` is the datalist section ("training", "validation", "test"): it keys the random stream.
    """
    normal = normal_2d(seed, split, idx, category, image_size, zoom)
    if not anomalous:
        return normal, normal.copy(), np.zeros_like(normal, dtype=bool), []
    bank = prototype_bank_2d(seed, category, image_size) if bank is None else bank
    rng = _rng(seed, "defects", split, idx)
    foreign = texture(_foreign(category)).shape[0]
    img, mask, defects = normal.astype(np.float64), np.zeros(normal.shape, dtype=bool), []
    unused = list(bank)  # one image does not repeat a prototype
    for _ in range(1 if rng.random() < 0.75 else 2):
        if unused and rng.random() < recurrence:
            d = _jitter(rng, unused.pop(int(rng.integers(len(unused)))), image_size, position_jitter)
        else:
            d = _random_defect(rng, DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))], image_size, foreign)
        img, support = apply_defect(img, d, category)
        mask |= support
        defects.append(d)
    image = np.where(mask, np.clip(np.round(img), 0, 255), normal).astype(np.uint8)
    return normal, image, mask, defects


def _save_png(path: str, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path, format="PNG")


def make_2d(
    out_dir: str,
    n_train: int = 200,
    n_val: int = 20,
    n_test: int = 40,
    image_size: int = 64,
    anomalous_fraction: float = 0.8,
    test_anomalous_fraction: float = 0.5,
    categories: Sequence[str] | str = ("brick",),
    recurrence: float = 0.8,
    n_prototypes: int = 4,
    texture_zoom: float | None = None,
    position_jitter: float = 0.1,
    seed: int = 0,
    preview: bool = True,
    progress: bool | None = None,
) -> str:
    """Write the 2D inspection set into `out_dir` and return its datalist path.

    Validation has the training contamination (users have no clean data); test has `test_anomalous_fraction`.
    Categories alternate over the entries; each has its own prototype bank. `texture_zoom` rescales the source
    textures (None: TEXTURE_ZOOM per category). `position_jitter`: how far (fraction of the image size) a recurring
    defect moves from its prototype's position; 0.1 keeps it near one site, 0.5 lets it recur anywhere, as the same
    kind of defect does on a production line. `progress=None`: bar only on a TTY.
    """
    categories = _as_tuple(categories, str)
    for c in categories:
        texture(c)  # fail early on an unknown category
    if not 0.0 <= recurrence <= 1.0:
        raise ValueError(f"recurrence must be in [0, 1], got {recurrence}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    params = dict(
        kind="2d", n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size,
        anomalous_fraction=anomalous_fraction, test_anomalous_fraction=test_anomalous_fraction,
        categories=list(categories), recurrence=recurrence, n_prototypes=n_prototypes, texture_zoom=texture_zoom,
        position_jitter=position_jitter, seed=seed, preview=preview,
    )  # fmt: skip
    banks = {c: prototype_bank_2d(seed, c, image_size, n_prototypes) for c in categories}
    counts = {"training": n_train, "validation": n_val, "test": n_test}
    fractions = {"training": anomalous_fraction, "validation": anomalous_fraction, "test": test_anomalous_fraction}

    def sample(split: str, idx: int, anomalous: bool) -> tuple[np.ndarray, np.ndarray, dict]:
        category = categories[idx % len(categories)]
        _, image, mask, defects = sample_2d(
            seed,
            split,
            idx,
            anomalous,
            category,
            image_size,
            recurrence,
            banks[category],
            texture_zoom,
            position_jitter,
        )
        return image, mask.astype(np.uint8) * 255, {"category": category, "defects": [asdict(d) for d in defects]}

    return _write_dataset(out_dir, params, counts, fractions, sample, ".png", _save_png, _preview_2d, progress)


# ----------------------------------------------------------------------------------------------------------- 3D

# Anatomy of a ~1.75 m adult in mm (RAS: +x patient's right, +y anterior, +z superior; 0 = centre of the field of
# view) and typical FDG uptake in SUV with its inter-subject range (multiplicative unless marked absolute).
TRUNK_RADII = (160.0, 105.0)  # elliptic cylinder from the bottom of the field of view up to the shoulders
TRUNK_TOP = 100.0  # shoulders: half-ellipsoid cap of height 60 above this
ORGANS: dict[str, dict[str, Any]] = {  # painted in this order; later organs overwrite earlier ones
    "lung_r": dict(center=(75, -5, 50), radii=(55, 75, 100), suv=0.35, var=(0.8, 1.2)),
    "lung_l": dict(center=(-75, -5, 50), radii=(55, 75, 100), suv=0.35, var=(0.8, 1.2)),
    "bowel": dict(center=(0, 40, -190), radii=(90, 50, 60), suv=1.2, var=(0.7, 1.3)),
    "liver": dict(center=(60, 10, -80), radii=(95, 75, 65), suv=2.3, var=(0.85, 1.15)),
    "spleen": dict(center=(-85, -25, -70), radii=(35, 30, 50), suv=1.9, var=(0.85, 1.15)),
    "kidney_r": dict(center=(60, -50, -140), radii=(28, 25, 50), suv=3.5, var=(0.7, 1.3), hot=True),
    "kidney_l": dict(center=(-60, -50, -140), radii=(28, 25, 50), suv=3.5, var=(0.7, 1.3), hot=True),
    "heart": dict(center=(-20, 35, 0), radii=(55, 45, 55), suv=4.0, var=(1.5, 8.0), absolute=True, hot=True),
    "blood_pool": dict(center=(-20, 35, 0), radii=(41, 31, 41), suv=1.8, var=(0.85, 1.15), hot=True),
    "bladder": dict(center=(0, 40, -290), radii=(45, 38, 35), suv=20.0, var=(8.0, 40.0), absolute=True, hot=True),
    "brain": dict(center=(0, 0, 280), radii=(60, 78, 70), suv=8.0, var=(0.8, 1.2), hot=True),
}
HEAD = dict(center=(0, 0, 270), radii=(75, 95, 95))
NECK = dict(center=(0, 5), radii=(52, 52), z=(150, 210))
SPINE = dict(center=(0, -75), radii=(18, 18), z=(-330, 160))
TISSUE_SUV = dict(fat=0.35, muscle=0.7, head=0.8, neck=0.8, spine=1.6)
# Sites where lesions recur (lymph-node stations, organs, bone); the trunk-wide one-offs are drawn anywhere.
LESION_SITES = {
    "neck_r": (30, 10, 165), "neck_l": (-30, 10, 165), "axilla_r": (125, -10, 110), "axilla_l": (-125, -10, 110),
    "mediastinum": (0, 10, 85), "lung_r": (85, -20, 60), "lung_l": (-85, -20, 40), "liver": (70, 0, -90),
    "para_aortic": (0, -40, -150), "pelvis_r": (70, 0, -270), "pelvis_l": (-70, 0, -270), "spine": (0, -75, -60),
}  # fmt: skip
LESION_SUV = (4.5, 15.0)  # above every non-excluded tissue, so a lesion is hotter wherever its mask is


@dataclass(frozen=True)
class Lesion:
    """One hot lesion: an ellipsoid in mm, peak uptake in SUV falling to 80 % at its rim."""

    site: str
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    angles: tuple[float, float, float]  # Euler "zyx", radians
    uptake: float
    prototype: int = -1


@lru_cache(maxsize=8)
def _coords(grid: tuple[int, int, int], fov_mm: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """Voxel-centre coordinates in mm, broadcastable (x[:,None,None], y[None,:,None], z[None,None,:])."""
    axes = [(np.arange(n) - (n - 1) / 2) * (f / n) for n, f in zip(grid, fov_mm)]
    return tuple(np.asarray(a).reshape([-1 if i == k else 1 for i in range(3)]) for k, a in enumerate(axes))


def affine_3d(grid: Sequence[int], fov_mm: Sequence[float]) -> np.ndarray:
    """RAS affine with the field of view centred on the origin."""
    spacing = np.asarray(fov_mm, float) / np.asarray(grid, float)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(grid) - 1) / 2 * spacing
    return affine


def _ellipsoid(xyz: tuple[np.ndarray, ...], center: Sequence[float], radii: Sequence[float], rot=None) -> np.ndarray:
    """Normalised radius r (r <= 1 inside); `rot` maps ellipsoid axes to world axes."""
    d = [xyz[i] - center[i] for i in range(3)]
    if rot is not None:
        d = [rot[0, k] * d[0] + rot[1, k] * d[1] + rot[2, k] * d[2] for k in range(3)]
    return np.sqrt(sum((d[k] / radii[k]) ** 2 for k in range(3)))


def _cylinder(xyz, center, radii, z_range) -> np.ndarray:
    inside = ((xyz[0] - center[0]) / radii[0]) ** 2 + ((xyz[1] - center[1]) / radii[1]) ** 2 <= 1
    return inside & (xyz[2] >= z_range[0]) & (xyz[2] <= z_range[1])


def _subject(
    rng: np.random.Generator, xyz: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free activity (SUV), body mask, mask of tissue a lesion must not overwrite, and the body scale."""
    scale = np.array([rng.uniform(0.88, 1.12), rng.uniform(0.88, 1.12), rng.uniform(0.96, 1.03)])
    shape = np.broadcast_shapes(*(a.shape for a in xyz))
    act, hot = np.zeros(shape, np.float32), np.zeros(shape, bool)
    s = lambda v: np.asarray(v, float) * scale[: len(v)]  # noqa: E731 - anatomy follows the body's size
    tr = s(TRUNK_RADII)
    trunk = _cylinder(xyz, (0, 0), tr, (-np.inf, TRUNK_TOP * scale[2]))
    trunk |= _ellipsoid(xyz, s((0, 0, TRUNK_TOP)), (*tr, 60 * scale[2])) <= 1
    muscle = _cylinder(xyz, (0, 0), tr - 15, (-np.inf, TRUNK_TOP * scale[2]))
    muscle |= _ellipsoid(xyz, s((0, 0, TRUNK_TOP)), (*(tr - 15), 45 * scale[2])) <= 1
    neck = _cylinder(xyz, s(NECK["center"]), s(NECK["radii"]), np.asarray(NECK["z"]) * scale[2])
    head = _ellipsoid(xyz, s(HEAD["center"]), s(HEAD["radii"])) <= 1
    act[trunk] = TISSUE_SUV["fat"]
    act[muscle & trunk] = TISSUE_SUV["muscle"] * rng.uniform(0.85, 1.15)
    act[neck] = TISSUE_SUV["neck"]
    act[head] = TISSUE_SUV["head"]
    spine = _cylinder(xyz, s(SPINE["center"]), s(SPINE["radii"]), np.asarray(SPINE["z"]) * scale[2])
    act[spine] = TISSUE_SUV["spine"] * rng.uniform(0.8, 1.2)
    body = trunk | neck | head
    heart_center = heart_radii = np.zeros(3)
    for name, o in ORGANS.items():
        if name == "blood_pool":  # the cavity inside the myocardium moves with the heart
            center = heart_center
            radii = np.asarray(o["radii"]) * heart_radii / np.asarray(ORGANS["heart"]["radii"])
        else:
            center = s(o["center"]) + rng.normal(0, 6, 3)
            radii = s(o["radii"]) * rng.uniform(0.9, 1.1, 3)
        if name == "heart":
            heart_center, heart_radii = center, radii
        lo, hi = o["var"]
        suv = rng.uniform(lo, hi) if o.get("absolute") else o["suv"] * rng.uniform(lo, hi)
        inside = (_ellipsoid(xyz, center, radii) <= 1) & body
        act[inside] = suv
        if o.get("hot"):
            hot |= inside
    return act, body, hot, scale


def _random_lesion(rng: np.random.Generator, center: np.ndarray, spacing: np.ndarray, site: str) -> Lesion:
    """Sizes in mm, floored at ~1.25 voxels of radius so that even coarse demo grids resolve every lesion."""
    r_lo, r_hi = max(8.0, 1.25 * spacing.max()), max(30.0, 3.0 * spacing.max())
    r = rng.uniform(r_lo, r_hi)
    radii = r * np.concatenate([[1.0], rng.uniform(0.7, 1.0, 2)])
    return Lesion(
        site, tuple(float(c) for c in center), tuple(float(v) for v in radii),
        tuple(float(a) for a in rng.uniform(-np.pi, np.pi, 3)), float(rng.uniform(*LESION_SUV)),
    )  # fmt: skip


def prototype_bank_3d(seed: int, n_prototypes: int = 6, grid=(32, 32, 64), fov_mm=(384, 384, 768)) -> list[Lesion]:
    """Recurring lesion types, fixed by the seed: site, shape, orientation, uptake; `center` is the offset (mm)
    from the site, which moves with each subject's anatomy."""
    rng = _rng(seed, "bank3d")
    spacing = np.asarray(fov_mm, float) / np.asarray(grid, float)
    names = list(LESION_SITES)
    sites = [names[i] for i in rng.permutation(len(names))]
    return [
        replace(_random_lesion(rng, rng.normal(0, 8, 3), spacing, sites[i % len(sites)]), prototype=i)
        for i in range(n_prototypes)
    ]


def _lesion_region(xyz, lesion: Lesion) -> tuple[np.ndarray, np.ndarray]:
    rot = Rotation.from_euler("zyx", lesion.angles).as_matrix()
    r = _ellipsoid(xyz, lesion.center, lesion.radii, rot)
    return r <= 1, r


def _finish(act: np.ndarray, noise_field: np.ndarray, noise: float, smoothing: float) -> np.ndarray:
    """Poisson-like noise (variance proportional to uptake), then the reconstruction's Gaussian smoothing."""
    noisy = np.maximum(act + noise * np.sqrt(act) * noise_field, 0)
    return ndimage.gaussian_filter(noisy, smoothing, mode="constant").astype(np.float32)


def sample_3d(
    seed: int,
    split: str,
    idx: int,
    anomalous: bool,
    grid: Sequence[int] = (32, 32, 64),
    fov_mm: Sequence[float] = (384.0, 384.0, 768.0),
    recurrence: float = 0.8,
    bank: Sequence[Lesion] | None = None,
    noise: float = 0.5,
    smoothing: float = 0.7,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Lesion]]:
    """(normal, image, mask, lesions) for one subject; normal and image share anatomy and noise realisation."""
    grid, fov_mm = tuple(int(g) for g in grid), tuple(float(f) for f in fov_mm)
    xyz = _coords(grid, fov_mm)
    spacing = np.asarray(fov_mm) / np.asarray(grid)
    rng = _rng(seed, "subject", split, idx)
    act, body, hot, scale = _subject(rng, xyz)
    below_head = xyz[2] < (HEAD["center"][2] - HEAD["radii"][2]) * scale[2]
    noise_field = rng.standard_normal(act.shape).astype(np.float32)
    normal = _finish(act, noise_field, noise, smoothing)
    if not anomalous:
        return normal, normal.copy(), np.zeros(act.shape, bool), []
    bank = prototype_bank_3d(seed, grid=grid, fov_mm=fov_mm) if bank is None else bank
    lrng = _rng(seed, "lesions", split, idx)
    allowed = body & ~hot & below_head  # lesions never overwrite brain, heart, kidneys or bladder
    candidates = np.argwhere(allowed)
    lesion_act, mask, lesions, unused = act.copy(), np.zeros(act.shape, bool), [], list(bank)
    n_lesions = 1 + int(lrng.random() < 0.45) + int(lrng.random() < 0.2)
    for attempt in range(50):
        if len(lesions) == n_lesions:
            break
        if unused and lrng.random() < recurrence and attempt < 25:
            p = unused.pop(int(lrng.integers(len(unused))))
            center = np.asarray(LESION_SITES[p.site]) * scale + np.asarray(p.center) + lrng.normal(0, 6, 3)
            lesion = replace(
                p, radii=tuple(float(r) for r in np.asarray(p.radii) * lrng.uniform(0.9, 1.1)),
                angles=tuple(float(a) for a in np.asarray(p.angles) + lrng.normal(0, 0.1, 3)),
                uptake=float(p.uptake * lrng.uniform(0.9, 1.1)), center=tuple(float(c) for c in center),
            )  # fmt: skip
        else:
            voxel = candidates[int(lrng.integers(len(candidates)))]
            center = np.array([xyz[k].ravel()[voxel[k]] for k in range(3)])
            lesion = _random_lesion(lrng, center, spacing, "random")
        # snap to a voxel centre so the lesion always covers at least its centre voxel
        snapped = [float(xyz[k].ravel()[np.abs(xyz[k].ravel() - lesion.center[k]).argmin()]) for k in range(3)]
        lesion = replace(lesion, center=tuple(snapped))
        inside, r = _lesion_region(xyz, lesion)
        inside &= allowed
        if not inside.any():  # centre fell into excluded tissue; after 25 attempts only one-offs are drawn
            continue
        lesion_act[inside] = np.maximum(lesion_act[inside], lesion.uptake * (1 - 0.2 * r[inside] ** 2))
        mask |= inside
        lesions.append(lesion)
    return normal, _finish(lesion_act, noise_field, noise, smoothing), mask, lesions


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)  # mtime=0: same seed, same bytes


def make_3d(
    out_dir: str,
    n_train: int = 60,
    n_val: int = 10,
    n_test: int = 20,
    grid: Sequence[int] | str = (32, 32, 64),
    anomalous_fraction: float = 1.0,
    test_anomalous_fraction: float = 0.5,
    recurrence: float = 0.8,
    n_prototypes: int = 6,
    fov_mm: Sequence[float] | str = (384.0, 384.0, 768.0),
    noise: float = 0.5,
    smoothing: float = 0.7,
    seed: int = 0,
    preview: bool = True,
    progress: bool | None = None,
) -> str:
    """Write the 3D whole-body PET-like set (SUV, float32 NIfTI) into `out_dir` and return its datalist path.

    The field of view is fixed in mm; `grid` sets the resolution (default 12 mm isotropic voxels). `noise` is the
    relative Poisson-like noise before `smoothing` (Gaussian sigma in voxels).
    """
    grid, fov_mm = _as_tuple(grid, int), _as_tuple(fov_mm, float)
    if len(grid) != 3 or len(fov_mm) != 3:
        raise ValueError(f"grid and fov_mm need 3 values, got {grid} and {fov_mm}")
    if not 0.0 <= recurrence <= 1.0:
        raise ValueError(f"recurrence must be in [0, 1], got {recurrence}")
    params = dict(
        kind="3d", n_train=n_train, n_val=n_val, n_test=n_test, grid=list(grid),
        anomalous_fraction=anomalous_fraction, test_anomalous_fraction=test_anomalous_fraction,
        recurrence=recurrence, n_prototypes=n_prototypes, fov_mm=list(fov_mm), noise=noise, smoothing=smoothing,
        seed=seed, preview=preview,
    )  # fmt: skip
    affine = affine_3d(grid, fov_mm)
    bank = prototype_bank_3d(seed, n_prototypes, grid, fov_mm)
    counts = {"training": n_train, "validation": n_val, "test": n_test}
    fractions = {"training": anomalous_fraction, "validation": anomalous_fraction, "test": test_anomalous_fraction}

    def sample(split: str, idx: int, anomalous: bool) -> tuple[np.ndarray, np.ndarray, dict]:
        _, image, mask, lesions = sample_3d(
            seed, split, idx, anomalous, grid, fov_mm, recurrence, bank, noise, smoothing
        )
        return image, mask.astype(np.uint8), {"category": "pet", "lesions": [asdict(les) for les in lesions]}

    def save(path: str, array: np.ndarray) -> None:
        with open(path, "wb") as f:
            f.write(_nifti_bytes(array, affine))

    return _write_dataset(out_dir, params, counts, fractions, sample, ".nii.gz", save, _preview_3d, progress)


# ------------------------------------------------------------------------------------------------- writing


def _write_dataset(out_dir, params, counts, fractions, sample, ext, save, make_preview, progress) -> str:
    """Images, labels, datalist.json (paths relative to out_dir), anomalies.json, params.json, preview.png."""
    for key in ("images", "labels"):
        os.makedirs(os.path.join(out_dir, key), exist_ok=True)
    datalist: dict[str, list[dict]] = {}
    anomalies: dict[str, list[dict]] = {}
    shown: list[tuple[np.ndarray, np.ndarray]] = []
    with tqdm(total=sum(counts.values()), desc=f"synthetic {params['kind']}", disable=_tqdm_disable(progress)) as bar:
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


def _tqdm_disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _figure(n: int):
    from scripts.plots import figure

    fig = figure(figsize=(1.6 * n, 1.9 if n else 1), dpi=100)
    return fig, fig.subplots(1, n, squeeze=False)[0]


def _save_figure(fig, path: str) -> None:
    fig.savefig(path, format="png", metadata={"Software": None})


def _preview_2d(path: str, shown: list[tuple[np.ndarray, np.ndarray]]) -> None:
    fig, axes = _figure(len(shown))
    for ax, (image, label) in zip(axes, shown):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        if label.any():
            ax.contour(label > 0, levels=[0.5], colors="r", linewidths=0.8)
        ax.set_axis_off()
    fig.suptitle("training images (red: anomaly masks)", fontsize=8)
    _save_figure(fig, path)


def _preview_3d(path: str, shown: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Coronal maximum-intensity projections, as PET readers look at whole-body scans."""
    fig, axes = _figure(len(shown))
    for ax, (image, label) in zip(axes, shown):
        ax.imshow(image.max(1).T, cmap="gray_r", vmin=0, vmax=10, origin="lower", aspect="auto")
        if label.any():
            ax.contour(label.max(1).T > 0, levels=[0.5], colors="r", linewidths=0.8)
        ax.set_axis_off()
    fig.suptitle("training subjects, coronal MIP, SUV 0-10 (red: lesions)", fontsize=8)
    _save_figure(fig, path)


# ------------------------------------------------------------------------------------------------- ensure


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
        raise FileExistsError(f"{dataset_dir}: folder exists without datalist.json; remove it or point elsewhere")
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
        wanted["categories"] = _as_tuple(wanted["categories"], str)
    for key in ("grid", "fov_mm"):
        if key in wanted:
            wanted[key] = _as_tuple(wanted[key], float)
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


if __name__ == "__main__":
    import fire

    fire.Fire({"make_2d": make_2d, "make_3d": make_3d, "ensure_dataset": ensure_dataset})
