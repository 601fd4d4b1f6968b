"""Tests for scripts/metrics.py: exactness against brute-force references, MVTec AD AUPRO semantics, validation."""

import os
import sys
import tracemalloc
from bisect import bisect

import numpy as np
import pytest
from scipy import ndimage, stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts import metrics  # noqa: E402
from scripts.metrics import aupro, best_dice, image_auroc, pixel_auroc, pixel_metrics, pro_curve  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------------
# brute-force references (tiny inputs only)
# ---------------------------------------------------------------------------------------------------------------------


def _images(x):
    return [np.asarray(im) for im in x]


def ref_pixel_auroc(scores, labels):
    """AUROC over all (positive, negative) pairs, ties count 1/2."""
    s = np.concatenate([im.ravel() for im in _images(scores)]).astype(np.float64)
    lab = np.concatenate([im.ravel() for im in _images(labels)]).astype(bool)
    pos, neg = s[lab], s[~lab]
    return float(
        ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / pos.size / neg.size
    )


def ref_image_auroc(scores, labels):
    smax = [im.max() for im in _images(scores)]
    lab = [bool(im.any()) for im in _images(labels)]
    return ref_pixel_auroc([np.array(smax)], [np.array(lab)])


def ref_pro_curve(scores, labels, full_connectivity=True):
    """Loop over every distinct threshold; FPR over all normal voxels, PRO with a per-region loop."""
    scores, labels = _images(scores), _images(labels)
    regions = []
    for i, lab in enumerate(labels):
        structure = np.ones((3,) * lab.ndim) if full_connectivity else ndimage.generate_binary_structure(lab.ndim, 1)
        comp, n = ndimage.label(lab.astype(bool), structure=structure)
        regions += [(i, comp == k) for k in range(1, n + 1)]
    n_normal = sum(int((lab == 0).sum()) for lab in labels)
    thresholds = sorted({float(v) for s in scores for v in s.ravel()}, reverse=True)
    fpr, pro = [], []
    for t in thresholds:
        fpr.append(sum(int(((s >= t) & (lab == 0)).sum()) for s, lab in zip(scores, labels)) / n_normal)
        pro.append(float(np.mean([(scores[i][m] >= t).mean() for i, m in regions])))
    return np.array(fpr), np.array(pro), np.array(thresholds)


def ref_aupro(scores, labels, fpr_limit=0.3, full_connectivity=True):
    fpr, pro, _ = ref_pro_curve(scores, labels, full_connectivity)
    x, y = [0.0] + list(fpr), [0.0] + list(pro)
    area = 0.0
    for k in range(1, len(x)):
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        if x1 <= fpr_limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            if x0 < fpr_limit:
                y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
                area += 0.5 * (y0 + y_lim) * (fpr_limit - x0)
            break
    return area / fpr_limit


def ref_best_dice(scores, labels):
    s = np.concatenate([im.ravel() for im in _images(scores)])
    lab = np.concatenate([im.ravel() for im in _images(labels)]).astype(bool)
    best = -1.0
    for t in np.unique(s):
        pred = s >= t
        best = max(best, 2.0 * (pred & lab).sum() / (pred.sum() + lab.sum()))
    return best


def official_mvtec_aupro(anomaly_maps, ground_truth_maps, integration_limit=0.3):
    """Compact transcription of compute_pro / trapezoid / calculate_au_pro of the MVTec AD evaluation code (2D)."""
    fp_changes, pro_changes, num_ok, num_regions = [], [], 0, 0
    for gt in ground_truth_maps:
        labeled, n = ndimage.label(gt, np.ones((3, 3), dtype=int))
        num_regions += n
        ok = labeled == 0
        num_ok += ok.sum()
        pro_change = np.zeros(gt.shape)
        for k in range(n):
            region = labeled == k + 1
            pro_change[region] = 1.0 / region.sum()
        fp_changes.append(ok.astype(np.uint32).ravel())
        pro_changes.append(pro_change.ravel())
    flat = np.concatenate([a.ravel() for a in anomaly_maps])
    idx = np.argsort(flat)[::-1]
    flat, fp_c, pro_c = flat[idx], np.concatenate(fp_changes)[idx], np.concatenate(pro_changes)[idx]
    fprs = np.cumsum(fp_c, dtype=np.float64) / num_ok
    pros = np.cumsum(pro_c, dtype=np.float64) / num_regions
    keep = np.append(np.diff(flat) != 0, True)
    x = np.clip(np.concatenate(([0.0], fprs[keep], [1.0])), 0, 1)
    y = np.clip(np.concatenate(([0.0], pros[keep], [1.0])), 0, 1)
    correction = 0.0
    if integration_limit not in x:
        ins = bisect(x, integration_limit)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (integration_limit - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (integration_limit - x[ins - 1])
    mask = x <= integration_limit
    x, y = x[mask], y[mask]
    return (np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction) / integration_limit


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def random_case(rng, shape, n_images=4, n_levels=None, p_anom=0.25, empty_images=1):
    """Random blobby binary labels and random scores; ``n_levels`` quantises scores to force many ties."""
    labels = (ndimage.uniform_filter(rng.random((n_images,) + shape), size=2) < p_anom).astype(np.uint8)
    labels[:empty_images] = 0
    labels[-1].flat[0] = 1  # at least one anomalous voxel
    labels[-1].flat[-1] = 0  # and at least one normal one
    scores = rng.random((n_images,) + shape)
    if n_levels is not None:
        scores = np.floor(scores * n_levels) / n_levels
    return scores, labels


def blob_set(rng, n_images=40, size=64, n_rect=3):
    labels = np.zeros((n_images, size, size), dtype=bool)
    for i in range(n_images // 2, n_images):  # half of the images are anomaly-free
        for _ in range(n_rect):
            y, x = rng.integers(0, size - 12, 2)
            h, w = rng.integers(4, 12, 2)
            labels[i, y : y + h, x : x + w] = True
    return labels


def assert_all_metrics_equal(a, b, tol=1e-12):
    (sa, la), (sb, lb) = a, b
    assert pixel_auroc(sa, la) == pytest.approx(pixel_auroc(sb, lb), abs=tol)
    assert aupro(sa, la) == pytest.approx(aupro(sb, lb), abs=tol)
    assert image_auroc(sa, la) == pytest.approx(image_auroc(sb, lb), abs=tol)
    assert best_dice(sa, la)[0] == pytest.approx(best_dice(sb, lb)[0], abs=tol)
    assert_pixel_metrics_consistent(sa, la)


def assert_pixel_metrics_consistent(scores, labels, fpr_limit=0.3):
    """The single-sweep combined function must equal the three separate metrics exactly."""
    combined = pixel_metrics(scores, labels, fpr_limit)
    dice, thr = best_dice(scores, labels)
    assert combined == {
        "pixel_auroc": pixel_auroc(scores, labels),
        "aupro": aupro(scores, labels, fpr_limit),
        "best_dice": dice,
        "dice_threshold": thr,
    }


# ---------------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 32), (8, 12, 12)])
def test_perfect_maps(shape):
    _, labels = random_case(np.random.default_rng(0), shape, n_images=6)
    scores = labels.astype(np.float32)
    assert pixel_auroc(scores, labels) == 1.0
    assert aupro(scores, labels) == pytest.approx(1.0, abs=1e-12)
    assert image_auroc(scores, labels) == 1.0
    dice, thr = best_dice(scores, labels)
    assert dice == 1.0 and thr == 1.0


def test_inverted_maps():
    _, labels = random_case(np.random.default_rng(1), (32, 32))
    assert pixel_auroc(1.0 - labels, labels) == 0.0
    assert aupro(1.0 - labels, labels) == 0.0


def test_random_maps():
    rng = np.random.default_rng(2)
    labels = blob_set(rng)
    scores = rng.random(labels.shape).astype(np.float32)
    assert pixel_auroc(scores, labels) == pytest.approx(0.5, abs=0.01)
    assert aupro(scores, labels) == pytest.approx(0.15, abs=0.015)
    assert aupro(scores, labels, fpr_limit=1.0) == pytest.approx(0.5, abs=0.015)


@pytest.mark.parametrize("transform", [np.exp, lambda x: 3 * x + 1, lambda x: np.sqrt(x + 0.5)])
def test_monotone_invariance(transform):
    rng = np.random.default_rng(3)
    scores, labels = random_case(rng, (24, 24), n_images=6)
    scores = scores + 0.5 * labels  # informative, so the metrics are not trivial
    t_scores = transform(scores)
    assert_all_metrics_equal((scores, labels), (t_scores, labels))
    d, thr = best_dice(scores, labels)
    d_t, thr_t = best_dice(t_scores, labels)
    assert d == d_t and thr_t == pytest.approx(float(transform(np.float64(thr))), rel=1e-12)


def test_diagonal_pixels_form_one_region_2d():
    labels = np.zeros((1, 8, 8), dtype=np.uint8)
    labels[0, 2, 2] = labels[0, 3, 3] = 1  # touch only diagonally
    labels[0, 6, 6] = 1
    scores = np.linspace(0.0, 0.5, 64).reshape(1, 8, 8)
    scores[0, 2, 2], scores[0, 3, 3], scores[0, 6, 6] = 0.9, 0.2, 0.6
    value = aupro(scores, labels)
    assert value == pytest.approx(ref_aupro(scores, labels), abs=1e-12)
    assert value == pytest.approx(official_mvtec_aupro(list(scores), list(labels)), abs=1e-12)
    assert abs(value - ref_aupro(scores, labels, full_connectivity=False)) > 1e-3  # 4-connectivity differs
    assert pro_curve(scores, labels)[1][0] == pytest.approx(0.25)  # 1 of 2 voxels in 1 of 2 regions


def test_corner_voxels_form_one_region_3d():
    labels = np.zeros((1, 5, 5, 5), dtype=bool)
    labels[0, 1, 1, 1] = labels[0, 2, 2, 2] = True  # touch only at a corner
    labels[0, 4, 4, 4] = True
    scores = np.linspace(0.0, 0.5, 125).reshape(1, 5, 5, 5)
    scores[0, 1, 1, 1], scores[0, 2, 2, 2], scores[0, 4, 4, 4] = 0.9, 0.2, 0.6
    value = aupro(scores, labels)
    assert value == pytest.approx(ref_aupro(scores, labels), abs=1e-12)
    assert abs(value - ref_aupro(scores, labels, full_connectivity=False)) > 1e-3  # 6-connectivity differs


def test_anomaly_free_images_change_fpr_not_pro():
    rng = np.random.default_rng(4)
    scores, labels = random_case(rng, (16, 16), n_images=3, empty_images=0)
    extra_scores = rng.random((3, 16, 16)) * 0.8 + 0.2
    more_scores = np.concatenate([scores, extra_scores])
    more_labels = np.concatenate([labels, np.zeros_like(labels)])
    fpr, pro, thr = pro_curve(scores, labels)
    fpr2, pro2, thr2 = pro_curve(more_scores, more_labels)
    pos = {t: i for i, t in enumerate(thr2)}
    j = np.array([pos[t] for t in thr])  # every original threshold is still a threshold
    np.testing.assert_allclose(pro2[j], pro, rtol=0, atol=1e-12)
    assert not np.allclose(fpr2[j], fpr)
    assert abs(aupro(more_scores, more_labels) - aupro(scores, labels)) > 1e-3


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape,n_levels", [((7, 9), None), ((7, 9), 5), ((4, 5, 6), None), ((4, 5, 6), 4)])
def test_against_brute_force(seed, shape, n_levels):
    rng = np.random.default_rng(seed)
    scores, labels = random_case(rng, shape, n_images=3, n_levels=n_levels)
    assert pixel_auroc(scores, labels) == pytest.approx(ref_pixel_auroc(scores, labels), abs=1e-9)
    assert image_auroc(scores, labels) == pytest.approx(ref_image_auroc(scores, labels), abs=1e-9)
    for limit in (0.05, 0.3, 1.0):
        assert aupro(scores, labels, limit) == pytest.approx(ref_aupro(scores, labels, limit), abs=1e-9)
    fpr, pro, thr = pro_curve(scores, labels)
    r_fpr, r_pro, r_thr = ref_pro_curve(scores, labels)
    np.testing.assert_allclose(thr, r_thr, rtol=0, atol=0)
    np.testing.assert_allclose(fpr, r_fpr, rtol=0, atol=1e-9)
    np.testing.assert_allclose(pro, r_pro, rtol=0, atol=1e-9)
    dice, t = best_dice(scores, labels)
    assert dice == pytest.approx(ref_best_dice(scores, labels), abs=1e-9)
    pred, lab = scores >= t, labels.astype(bool)
    assert dice == pytest.approx(2 * (pred & lab).sum() / (pred.sum() + lab.sum()), abs=1e-12)
    assert_pixel_metrics_consistent(scores, labels, fpr_limit=0.05)
    if len(shape) == 2:
        assert aupro(scores, labels) == pytest.approx(official_mvtec_aupro(list(scores), list(labels)), abs=1e-9)


def test_small_chunks_give_same_results(monkeypatch):
    """Tie groups straddling chunk borders and multi-chunk streaming must not change anything."""
    rng = np.random.default_rng(5)
    scores, labels = random_case(rng, (9, 11), n_images=4, n_levels=6)
    expected = (
        pixel_auroc(scores, labels),
        aupro(scores, labels),
        best_dice(scores, labels),
        pro_curve(scores, labels),
    )
    for chunk in (1, 2, 7, 64):
        monkeypatch.setattr(metrics, "CHUNK_SIZE", chunk)
        assert pixel_auroc(scores, labels) == pytest.approx(expected[0], abs=1e-12)
        assert aupro(scores, labels) == pytest.approx(expected[1], abs=1e-12)
        assert best_dice(scores, labels) == pytest.approx(expected[2], abs=1e-12)
        for a, b in zip(pro_curve(scores, labels), expected[3]):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_pixel_auroc_matches_mannwhitneyu():
    rng = np.random.default_rng(6)
    scores, labels = random_case(rng, (40, 40), n_images=5, n_levels=50)
    scores = scores + 0.1 * labels
    pos, neg = scores[labels == 1], scores[labels == 0]
    u = stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic
    assert pixel_auroc(scores, labels) == pytest.approx(u / (pos.size * neg.size), abs=1e-12)


def test_lists_of_different_shapes():
    rng = np.random.default_rng(7)
    shapes = [(6, 8), (9, 5), (7, 7)]
    scores = [np.floor(rng.random(s) * 6) / 6 for s in shapes]
    labels = [(rng.random(s) < 0.3).astype(np.uint8) for s in shapes]
    labels[0][:] = 0  # one anomaly-free image
    assert pixel_auroc(scores, labels) == pytest.approx(ref_pixel_auroc(scores, labels), abs=1e-9)
    assert image_auroc(scores, labels) == pytest.approx(ref_image_auroc(scores, labels), abs=1e-9)
    assert aupro(scores, labels) == pytest.approx(ref_aupro(scores, labels), abs=1e-9)
    assert aupro(scores, labels) == pytest.approx(official_mvtec_aupro(scores, labels), abs=1e-9)
    assert best_dice(scores, labels)[0] == pytest.approx(ref_best_dice(scores, labels), abs=1e-9)
    # 3D list vs 3D stack; mixed dtypes across list elements (levels k/8 are exact in float32)
    s3, l3 = random_case(rng, (4, 6, 5), n_images=3, n_levels=8)  # exact in float32
    s_list = [s3[0].astype(np.float32), s3[1], s3[2]]
    assert_all_metrics_equal((s_list, list(l3.astype(bool))), (s3, l3))
    s2, l2 = random_case(rng, (10, 10), n_images=4)
    assert_all_metrics_equal((list(s2), list(l2)), (s2, l2))
    assert_all_metrics_equal((tuple(s2), l2), (s2, l2))


def test_float32_input_and_memory():
    """The pooled sweep needs about 8 (argsort) + 1 (region ids) bytes per voxel for contiguous float32 input."""
    rng = np.random.default_rng(8)
    labels = np.zeros((4, 32, 128, 128), dtype=bool)
    labels[:, 10:20, 30:60, 40:90] = True
    labels[0] = False
    scores = rng.random(labels.shape, dtype=np.float32)
    n = scores.size
    tracemalloc.start()
    try:
        value = aupro(scores, labels)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert value == pytest.approx(0.15, abs=0.02)
    assert peak < 11 * n + 40 * metrics.CHUNK_SIZE + (8 << 20), f"peak {peak / n:.1f} bytes/voxel"
    assert scores.dtype == np.float32 and labels.dtype == bool  # inputs untouched


@pytest.mark.parametrize(
    "scores,labels,match",
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), "shape"),
        (np.zeros((2, 4, 4)), np.zeros((3, 4, 4)), "images"),
        (np.zeros((2, 4, 4)), np.full((2, 4, 4), 2), "binary"),
        (np.zeros((2, 4, 4)), np.full((2, 4, 4), 0.5), "binary"),
        (np.full((2, 4, 4), np.nan), np.zeros((2, 4, 4)), "NaN"),
        (np.zeros((4, 4)), np.zeros((4, 4)), r"\[N,H,W\]"),
        (np.zeros((2, 4, 4), dtype=complex), np.zeros((2, 4, 4)), "real"),
        (np.array(["a"] * 8).reshape(2, 2, 2), np.zeros((2, 2, 2)), "real"),
        ([np.zeros((4, 4)), np.zeros((3, 3))], [np.zeros((4, 4)), np.zeros((3, 4))], "shape"),
        ([np.zeros((4, 4)), np.zeros((3, 3, 3))], [np.zeros((4, 4)), np.zeros((3, 3, 3))], "mixes"),
        ([], [], "empty"),
    ],
)
def test_bad_inputs(scores, labels, match):
    for fn in (pixel_auroc, aupro, best_dice, image_auroc, pro_curve, pixel_metrics):
        with pytest.raises(ValueError, match=match):
            fn(scores, labels)


def test_nan_in_one_list_element():
    scores = [np.zeros((3, 3)), np.array([[0.0, np.nan], [1.0, 1.0]])]
    labels = [np.zeros((3, 3)), np.eye(2)]
    with pytest.raises(ValueError, match="NaN"):
        aupro(scores, labels)


def test_single_class_and_degenerate_sets():
    normal = np.zeros((2, 4, 4))
    with pytest.raises(ValueError, match="one class"):
        pixel_auroc(np.random.default_rng(0).random((2, 4, 4)), normal)
    with pytest.raises(ValueError, match="one class"):
        pixel_auroc(normal, np.ones((2, 4, 4)))
    labels = np.zeros((2, 4, 4))
    labels[:, 1, 1] = 1  # every image anomalous -> image AUROC undefined, pixel AUROC fine
    with pytest.raises(ValueError, match="one class"):
        image_auroc(np.zeros((2, 4, 4)), labels)
    assert pixel_auroc(labels, labels) == 1.0
    with pytest.raises(ValueError, match="no anomalous"):
        aupro(normal, normal)
    with pytest.raises(ValueError, match="no anomalous"):
        best_dice(normal, normal)
    with pytest.raises(ValueError, match="no normal"):
        aupro(normal, np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="no normal"):
        pixel_metrics(normal, np.ones((2, 4, 4)))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fpr_limit"):
            aupro(labels, labels, fpr_limit=bad)
        with pytest.raises(ValueError, match="fpr_limit"):
            pixel_metrics(labels, labels, fpr_limit=bad)
