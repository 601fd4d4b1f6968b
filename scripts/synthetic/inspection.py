"""The 2D "inspection" set: crops of scikit-image's bundled textures with scratches, blobs, foreign-texture patches
and intensity shifts; 8-bit grey PNG, 0-255. Mask = the support of the defect's blending weight: every pixel outside
it is bit-identical to the defect-free image. Package docstring: :mod:`scripts.synthetic`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np

from scripts.synthetic.common import as_tuple, preview_figure, save_figure, stream, write_dataset

TEXTURES = ("brick", "grass", "gravel")  # the textures scikit-image ships inside its package (no pooch download)
# Upsampling that keeps the textures learnable at 4x downsampling: 4x4 patches of 64-px crops quantised by k-means
# with 256 codes reach L1 ~0.016 (brick), 0.021 (gravel), 0.024 (grass) of the 0-255 range.
TEXTURE_ZOOM = {"brick": 1.0, "grass": 2.5, "gravel": 2.0}
DEFECT_KINDS = ("scratch", "blob", "patch", "shift")
ALPHA_CUTOFF = 0.15  # blending weights below this are dropped, so the mask covers only visibly altered pixels


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
    rng = stream(seed, "bank2d", category)
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
    rng = stream(seed, "normal", split, idx)
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
    rng = stream(seed, "defects", split, idx)
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
    categories = as_tuple(categories, str)
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

    return write_dataset(out_dir, params, counts, fractions, sample, ".png", _save_png, _preview_2d, progress)


def _preview_2d(path: str, shown: list[tuple[np.ndarray, np.ndarray]]) -> None:
    fig, axes = preview_figure(len(shown))
    for ax, (image, label) in zip(axes, shown):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        if label.any():
            ax.contour(label > 0, levels=[0.5], colors="r", linewidths=0.8)
        ax.set_axis_off()
    fig.suptitle("training images (red: anomaly masks)", fontsize=8)
    save_figure(fig, path)
