"""The 3D "whole-body PET-like" set: a body phantom in SUV units with hot ellipsoidal lesions; NIfTI float32 (RAS,
mm). Mask = the lesion's support on the voxel grid before noise and smoothing (smoothing spills a few voxels beyond).
Package docstring: :mod:`scripts.synthetic`."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from scripts.synthetic.common import as_tuple, preview_figure, save_figure, stream, write_dataset

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
    rng = stream(seed, "bank3d")
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
    rng = stream(seed, "subject", split, idx)
    act, body, hot, scale = _subject(rng, xyz)
    below_head = xyz[2] < (HEAD["center"][2] - HEAD["radii"][2]) * scale[2]
    noise_field = rng.standard_normal(act.shape).astype(np.float32)
    normal = _finish(act, noise_field, noise, smoothing)
    if not anomalous:
        return normal, normal.copy(), np.zeros(act.shape, bool), []
    bank = prototype_bank_3d(seed, grid=grid, fov_mm=fov_mm) if bank is None else bank
    lrng = stream(seed, "lesions", split, idx)
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
    grid, fov_mm = as_tuple(grid, int), as_tuple(fov_mm, float)
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

    return write_dataset(out_dir, params, counts, fractions, sample, ".nii.gz", save, _preview_3d, progress)


def _preview_3d(path: str, shown: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Coronal maximum-intensity projections, as PET readers look at whole-body scans."""
    fig, axes = preview_figure(len(shown))
    for ax, (image, label) in zip(axes, shown):
        ax.imshow(image.max(1).T, cmap="gray_r", vmin=0, vmax=10, origin="lower", aspect="auto")
        if label.any():
            ax.contour(label.max(1).T > 0, levels=[0.5], colors="r", linewidths=0.8)
        ax.set_axis_off()
    fig.suptitle("training subjects, coronal MIP, SUV 0-10 (red: lesions)", fontsize=8)
    save_figure(fig, path)


def noise_floor(
    n: int = 8,
    grid: Sequence[int] | str = (16, 16, 32),
    fov_mm: Sequence[float] | str = (384.0, 384.0, 768.0),
    recurrence: float = 0.8,
    noise: float = 0.5,
    smoothing: float = 0.7,
    suv_max: float = 15.0,
    seed: int = 0,
) -> dict[str, float]:
    """First-stage fidelity of a perfect denoiser on `n` validation subjects: their noise-free images taken as the
    reconstructions, intensities on the bundle's scale (SUV / `suv_max`, clipped). The floor of the L1 ratio inside /
    outside lesions for any first stage that does not learn the noise (docs/README.md, "3D first stage")."""
    import torch

    from scripts.vqvae import error_tally, fidelity, fidelity_ratios

    grid, fov_mm = as_tuple(grid, int), as_tuple(fov_mm, float)
    bank = prototype_bank_3d(seed, grid=grid, fov_mm=fov_mm)
    tally = 0
    for idx in range(n):
        args = (seed, "validation", idx, True, grid, fov_mm, recurrence, bank)
        _, image, mask, _ = sample_3d(*args, noise=noise, smoothing=smoothing)
        _, noise_free, _, _ = sample_3d(*args, noise=0.0, smoothing=smoothing)
        image, noise_free = (
            torch.from_numpy(np.clip(a, 0, suv_max) / suv_max)[None, None] for a in (image, noise_free)
        )
        tally = tally + error_tally(image, noise_free, torch.from_numpy(mask)[None, None])
    out = fidelity(tally)
    if "l1_matched" not in out:
        raise ValueError(f"no lesion voxels, or no normal voxels to compare with, in {n} subjects of grid {grid}")
    return {**out, **fidelity_ratios(out)}
