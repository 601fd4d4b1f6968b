"""Exact, memory-frugal evaluation metrics for anomaly maps (2D and 3D).

All functions take either one array shaped ``[N, H, W]`` / ``[N, D, H, W]`` or a list/tuple of per-image arrays
shaped ``[H, W]`` / ``[D, H, W]`` (the images of a list may differ in shape). Scores are real numbers, higher means
more anomalous; labels are binary (``bool`` or values in ``{0, 1}``).

Every metric is computed exactly from one global sort of all voxels (no binning, no threshold sub-sampling): the
voxels are visited in order of decreasing score, tie groups (equal scores) enter together, and each distinct score is
one threshold with prediction ``score >= threshold``. The sweep is done in fixed-size chunks so that, apart from the
pooled scores, the only arrays of the size of the data set are one ``int64`` sort permutation and one compact
(``uint8``/``uint16``/...) label or region-id array.

AUPRO follows the official MVTec AD definition (P. Bergmann, K. Batzner, M. Fauser, D. Sattlegger, C. Steger,
"The MVTec Anomaly Detection Dataset: A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection",
IJCV 129, 2021, and its reference evaluation code): ground-truth regions are the connected components of each image's
mask (8-connectivity in 2D, 26-connectivity in 3D), pooled over the whole set; the false positive rate is computed
over all normal voxels of all images, anomaly-free images included; the per-region overlap (PRO) at a threshold is
the mean over all regions of the fraction of the region's voxels with ``score >= threshold``; the PRO curve is
integrated with the trapezoidal rule over FPR from 0 up to ``fpr_limit`` (linear interpolation at the limit) and
normalised by the limit, so random scores give about ``fpr_limit / 2`` (0.15 for 0.3) and a perfect map gives 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["pixel_auroc", "aupro", "pro_curve", "best_dice", "image_auroc", "pixel_metrics"]

# Voxels per chunk of the sweep: bounds the temporaries (~50 bytes per chunk voxel) independently of the set size.
CHUNK_SIZE = 1 << 18

ArrayInput = np.ndarray | Sequence[np.ndarray]


@dataclass
class _Pooled:
    """All voxels of a set flattened into one sequence (images concatenated in order)."""

    scores: np.ndarray  # 1D, the caller's dtype (a view when possible, never up-cast)
    codes: np.ndarray  # 1D unsigned ints: 0 = normal, >0 = anomalous (label 1, or a global region id)
    n_pos: int  # anomalous voxels
    n_neg: int  # normal voxels
    weights: np.ndarray | None = None  # [n_regions + 1] float64 PRO increment per region id (index 0 -> 0)


def _as_images(x: ArrayInput, name: str) -> tuple[list[np.ndarray] | np.ndarray, int]:
    """Return an indexable sequence of per-image arrays and their spatial dimensionality (2 or 3).

    A single array is kept as is (its first axis indexes images) so that it can later be flattened without a copy.
    """
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError(f"{name} is an empty list")
        images = [np.asarray(im) for im in x]
        ndims = {im.ndim for im in images}
        if not ndims <= {2, 3}:
            raise ValueError(f"{name}: list elements must be single 2D [H,W] or 3D [D,H,W] images, got ndims {ndims}")
        if len(ndims) != 1:
            raise ValueError(f"{name}: list mixes 2D and 3D images")
        return images, ndims.pop()
    arr = np.asarray(x)
    if arr.ndim not in (3, 4):
        raise ValueError(f"{name} must be shaped [N,H,W] or [N,D,H,W] (or be a list of images), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} contains no images")
    return arr, arr.ndim - 1


def _validate(scores: ArrayInput, labels: ArrayInput) -> tuple[list | np.ndarray, list | np.ndarray, int]:
    """Check matching shapes, numeric NaN-free scores and binary labels; one image at a time to bound memory."""
    s_imgs, s_dim = _as_images(scores, "scores")
    l_imgs, l_dim = _as_images(labels, "labels")
    if len(s_imgs) != len(l_imgs):
        raise ValueError(f"scores has {len(s_imgs)} images but labels has {len(l_imgs)}")
    if s_dim != l_dim:
        raise ValueError(f"scores are {s_dim}D images but labels are {l_dim}D images")
    total = 0
    for i in range(len(s_imgs)):
        s, lab = s_imgs[i], l_imgs[i]
        if s.shape != lab.shape:
            raise ValueError(f"shape mismatch for image {i}: scores {s.shape} vs labels {lab.shape}")
        if not (np.issubdtype(s.dtype, np.number) or s.dtype == bool) or np.iscomplexobj(s):
            raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
        if np.issubdtype(s.dtype, np.inexact) and np.isnan(s).any():
            raise ValueError(f"scores of image {i} contain NaN")
        if lab.dtype != bool:
            if not (np.issubdtype(lab.dtype, np.number) and not np.iscomplexobj(lab)):
                raise ValueError(f"labels must be binary, got dtype {lab.dtype}")
            if not np.all((lab == 0) | (lab == 1)):
                raise ValueError(f"labels of image {i} are not binary (values other than 0 and 1 found)")
        total += s.size
    if total == 0:
        raise ValueError("scores contain no voxels")
    return s_imgs, l_imgs, s_dim


def _flat_scores(s_imgs: list | np.ndarray) -> np.ndarray:
    """Flatten all scores into one 1D array: a view for one contiguous array, else a single concatenation."""
    if isinstance(s_imgs, np.ndarray):
        return s_imgs.reshape(-1)
    out = np.empty(sum(s.size for s in s_imgs), dtype=np.result_type(*s_imgs))
    offset = 0
    for s in s_imgs:
        out[offset : offset + s.size] = s.reshape(-1)
        offset += s.size
    return out


def _code_dtype(max_code: int) -> np.dtype:
    """Smallest unsigned dtype that can hold ``max_code`` (region ids are usually few: 1-2 bytes per voxel)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_code <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _pool(scores: ArrayInput, labels: ArrayInput, regions: bool) -> _Pooled:
    """Validate and pool a set; with ``regions`` the codes are global connected-component ids with PRO weights."""
    s_imgs, l_imgs, dim = _validate(scores, labels)
    flat = _flat_scores(s_imgs)
    codes = np.zeros(flat.size, dtype=np.uint8)
    structure = np.ones((3,) * dim, dtype=bool)  # 8-connectivity in 2D, 26-connectivity in 3D
    sizes: list[np.ndarray] = []
    n_regions = 0
    n_pos = 0
    offset = 0
    for i in range(len(l_imgs)):
        mask = np.asarray(l_imgs[i]) != 0
        size = mask.size
        n_pos += int(np.count_nonzero(mask))
        if regions:
            lab, n = ndimage.label(mask, structure=structure, output=np.int32)
            if n > 0:
                sizes.append(np.bincount(lab.reshape(-1), minlength=n + 1)[1:])
                dt = _code_dtype(n_regions + n)
                if dt.itemsize > codes.itemsize:
                    codes = codes.astype(dt)
                lab[mask] += n_regions
                codes[offset : offset + size] = lab.reshape(-1)
                n_regions += n
        else:
            codes[offset : offset + size] = mask.reshape(-1)
        offset += size
    weights = None
    if regions:
        weights = np.zeros(n_regions + 1, dtype=np.float64)
        if n_regions:
            weights[1:] = 1.0 / (n_regions * np.concatenate(sizes).astype(np.float64))
    return _Pooled(flat, codes, n_pos, flat.size - n_pos, weights)


def _sweep(
    pooled: _Pooled, chunk: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
    """Visit voxels by decreasing score and yield, per chunk, the state at the end of each tie group.

    Yields ``(thresholds, tp, fp, pro)``: the distinct scores (decreasing) and, for prediction ``score >= threshold``,
    the cumulative true/false positive counts (int64) and, when region weights are present, the PRO (float64).
    A tie group that straddles a chunk border is reported once, in the chunk where it ends, so ties are merged.
    Only one argsort of the whole set is made; everything else is per-chunk.
    """
    chunk = CHUNK_SIZE if chunk is None else chunk
    scores, codes, weights = pooled.scores, pooled.codes, pooled.weights
    order = np.argsort(scores)  # ascending; read backwards. Tie order is irrelevant because ties are merged.
    n = order.size
    tp_carry = 0
    pro_carry = 0.0
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        idx = order[n - stop : n - start][::-1]  # positions start..stop-1 of the descending order
        s = scores[idx]
        ends = np.empty(s.size, dtype=bool)
        np.not_equal(s[:-1], s[1:], out=ends[:-1])
        ends[-1] = stop == n or s[-1] != scores[order[n - stop - 1]]
        c = codes[idx]
        tp = np.cumsum(c != 0, dtype=np.int64)
        tp += tp_carry
        fp = np.arange(start + 1, stop + 1, dtype=np.int64)
        fp -= tp
        pro = None
        if weights is not None:
            pro = np.cumsum(weights[c])
            pro += pro_carry
            pro_carry = float(pro[-1])
            pro = pro[ends]
        tp_carry = int(tp[-1])
        if ends.any():  # a chunk inside one long tie group has nothing to report yet
            yield s[ends], tp[ends], fp[ends], pro


class _AurocAcc:
    """Exact AUROC = P(pos > neg) + P(pos == neg) / 2 (Mann-Whitney U / (P N)), summed over tie groups in int64."""

    def __init__(self) -> None:
        self.twice_u = 0
        self.prev_tp = 0
        self.prev_fp = 0

    def update(self, thr: np.ndarray, tp: np.ndarray, fp: np.ndarray, pro: np.ndarray | None) -> None:
        tps = np.concatenate(([self.prev_tp], tp))
        neg_g = np.diff(fp, prepend=self.prev_fp)
        # a group's negatives lose to all positives of earlier groups and tie with the group's own positives
        self.twice_u += int(np.sum(neg_g * (tps[:-1] + tps[1:])))
        self.prev_tp, self.prev_fp = int(tp[-1]), int(fp[-1])

    def result(self, pooled: _Pooled) -> float:
        return self.twice_u / (2 * pooled.n_pos * pooled.n_neg)


class _DiceAcc:
    """Best Dice over tie-group thresholds; the first (highest) threshold wins ties."""

    def __init__(self, n_pos: int) -> None:
        self.n_pos = n_pos
        self.best = -1.0
        self.best_thr: float | None = None

    def update(self, thr: np.ndarray, tp: np.ndarray, fp: np.ndarray, pro: np.ndarray | None) -> None:
        dice = 2.0 * tp / (tp + fp + self.n_pos)  # 2TP / (2TP + FP + FN), with TP + FN = n_pos
        j = int(np.argmax(dice))
        if dice[j] > self.best:
            self.best, self.best_thr = float(dice[j]), float(thr[j].item())

    def result(self) -> tuple[float, float]:
        return self.best, self.best_thr


class _AuproAcc:
    """Streaming trapezoid of PRO over FPR from (0, 0) up to the limit, interpolating linearly at the limit."""

    def __init__(self, n_neg: int, fpr_limit: float) -> None:
        self.n_neg = n_neg
        self.limit = fpr_limit
        self.area = 0.0
        self.x_prev, self.y_prev = 0.0, 0.0
        self.done = False

    def update(self, thr: np.ndarray, tp: np.ndarray, fp: np.ndarray, pro: np.ndarray | None) -> None:
        if self.done:
            return
        xs = np.concatenate(([self.x_prev], fp / self.n_neg))
        ys = np.concatenate(([self.y_prev], np.minimum(pro, 1.0)))  # clip float round-off, as the reference does
        k = int(np.searchsorted(xs, self.limit, side="right"))  # points with fpr <= limit (k >= 1: xs[0] <= limit)
        self.area += float(np.sum(0.5 * (ys[1:k] + ys[: k - 1]) * (xs[1:k] - xs[: k - 1])))
        if k < xs.size:
            x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
            y_lim = y0 + (y1 - y0) * (self.limit - x0) / (x1 - x0)
            self.area += 0.5 * (y0 + y_lim) * (self.limit - x0)
            self.done = True
        self.x_prev, self.y_prev = xs[-1], ys[-1]

    def result(self) -> float:
        return self.area / self.limit


def _check_classes(pooled: _Pooled, what: str) -> None:
    if pooled.n_pos == 0 or pooled.n_neg == 0:
        raise ValueError(
            f"{what} is undefined: only one class present (anomalous={pooled.n_pos}, normal={pooled.n_neg})"
        )


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def _pool_for_pro(scores: ArrayInput, labels: ArrayInput) -> _Pooled:
    pooled = _pool(scores, labels, regions=True)
    if pooled.n_pos == 0:
        raise ValueError("PRO is undefined: labels contain no anomalous region")
    if pooled.n_neg == 0:
        raise ValueError("PRO curve FPR is undefined: labels contain no normal voxel")
    return pooled


def pixel_auroc(scores: ArrayInput, labels: ArrayInput) -> float:
    """Exact voxel-level AUROC over the pooled set; ties count one half (rank-based, no binning)."""
    pooled = _pool(scores, labels, regions=False)
    _check_classes(pooled, "pixel AUROC")
    acc = _AurocAcc()
    for group in _sweep(pooled):
        acc.update(*group)
    return acc.result(pooled)


def image_auroc(scores: ArrayInput, labels: ArrayInput) -> float:
    """Exact image-level AUROC: image score = max of its map, image label = any anomalous voxel."""
    s_imgs, l_imgs, _ = _validate(scores, labels)
    img_scores = np.array([np.max(s_imgs[i]) for i in range(len(s_imgs))])
    img_labels = np.array([np.any(l_imgs[i]) for i in range(len(l_imgs))], dtype=np.uint8)
    n_pos = int(img_labels.sum())
    pooled = _Pooled(img_scores, img_labels, n_pos, img_labels.size - n_pos)
    _check_classes(pooled, "image AUROC")
    acc = _AurocAcc()
    for group in _sweep(pooled):
        acc.update(*group)
    return acc.result(pooled)


def best_dice(scores: ArrayInput, labels: ArrayInput) -> tuple[float, float]:
    """Best Dice of the pooled voxels over all distinct thresholds (``score >= threshold``).

    Returns ``(dice, threshold)``; among equal best Dice values the highest threshold is returned.
    """
    pooled = _pool(scores, labels, regions=False)
    if pooled.n_pos == 0:
        raise ValueError("best Dice is undefined: labels contain no anomalous voxel")
    acc = _DiceAcc(pooled.n_pos)
    for group in _sweep(pooled):
        acc.update(*group)
    return acc.result()


def pro_curve(scores: ArrayInput, labels: ArrayInput) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full PRO curve: ``(fpr, pro, thresholds)`` at every distinct score, thresholds decreasing (FPR increasing).

    Materialises one point per distinct score (no artificial (0, 0) / (1, 1) end points); for large sets prefer
    :func:`aupro`, which streams and stops at the FPR limit.
    """
    pooled = _pool_for_pro(scores, labels)
    thr, fpr, pro = [], [], []
    for t, _, fp, p in _sweep(pooled):
        thr.append(t)
        fpr.append(fp / pooled.n_neg)
        pro.append(np.minimum(p, 1.0))  # clip float round-off, as the reference code does
    return np.concatenate(fpr), np.concatenate(pro), np.concatenate(thr)


def aupro(scores: ArrayInput, labels: ArrayInput, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (official MVTec AD definition, see module docstring).

    The curve starts at (0, 0); the sweep stops as soon as the FPR passes the limit.
    """
    _check_fpr_limit(fpr_limit)
    pooled = _pool_for_pro(scores, labels)
    acc = _AuproAcc(pooled.n_neg, fpr_limit)
    for group in _sweep(pooled):
        acc.update(*group)
        if acc.done:
            break
    return acc.result()


def pixel_metrics(scores: ArrayInput, labels: ArrayInput, fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel AUROC, AUPRO and best Dice (with its threshold) from a single sort and sweep.

    Identical to calling :func:`pixel_auroc`, :func:`aupro` and :func:`best_dice` separately, but the global sort,
    which dominates the run time on large 3D sets, is done once instead of three times.
    """
    _check_fpr_limit(fpr_limit)
    pooled = _pool_for_pro(scores, labels)
    accs = (_AurocAcc(), _AuproAcc(pooled.n_neg, fpr_limit), _DiceAcc(pooled.n_pos))
    for group in _sweep(pooled):
        for acc in accs:
            acc.update(*group)
    dice, thr = accs[2].result()
    return {"pixel_auroc": accs[0].result(pooled), "aupro": accs[1].result(), "best_dice": dice, "dice_threshold": thr}


def image_aupro(score: np.ndarray, label: np.ndarray, fpr_limit: float = 0.3) -> float:
    """One image's own AUPRO (NaN where it has no anomalous or no normal voxel): the unit of paired per-image
    comparisons, where a set-level difference on few images can rest on one or two of them."""
    label = np.asarray(label, dtype=bool)
    return aupro(score[None], label[None], fpr_limit) if label.any() and not label.all() else float("nan")
