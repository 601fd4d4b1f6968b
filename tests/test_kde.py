"""The KDE must be the paper's eq. 2-4 at every voxel, whatever the chunking, shape or channel count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scripts.kde import kde_chunk_size, kde_log_density, silverman_bandwidth

EPS = 0.05


pytestmark = pytest.mark.usefixtures("single_thread")


def reference_log_density(image: np.ndarray, recons: np.ndarray, eps: float) -> np.ndarray:
    """Direct per-voxel formula in float64: h = (4 s^5 / 3R)^(1/5) + eps, L = log(mean_r N(x; x_r, h^2))."""
    r = recons.shape[0]
    x, xr = image.reshape(-1), recons.reshape(r, -1)
    out = np.empty_like(x, dtype=np.float64)
    for v in range(x.size):
        s = np.std(xr[:, v], ddof=1)
        h = (4 * s**5 / (3 * r)) ** 0.2 + eps
        k = np.exp(-0.5 * ((x[v] - xr[:, v]) / h) ** 2) / math.sqrt(2 * math.pi)
        out[v] = np.log(np.sum(k / h) / r)
    return out.reshape(image.shape)


def make_data(shape: tuple[int, ...], r: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(shape, generator=g, dtype=torch.float64)
    spread = torch.rand(shape, generator=g, dtype=torch.float64) * 0.2  # voxels from tight to loose
    recons = image + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64) * 0.1
    recons = recons + spread * torch.randn((r, *shape), generator=g, dtype=torch.float64)
    return image, recons


@pytest.mark.parametrize("shape", [(1, 6, 7), (1, 3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    image, recons = make_data(shape, r=30)
    expected = reference_log_density(image.numpy(), recons.numpy(), EPS)
    got = kde_log_density(image, recons, EPS, dtype=dtype)
    assert got.shape == shape and got.dtype == dtype
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-5, rtol=1e-5)


def test_far_from_every_reconstruction_is_finite() -> None:
    """logsumexp: an image 10 bandwidths away gives a large negative log-density, not -inf."""
    recons = torch.zeros(20, 1, 2, 2)
    image = torch.full((1, 2, 2), 5.0)
    got = kde_log_density(image, recons, EPS)
    expected = -0.5 * (5.0 / EPS) ** 2 - math.log(EPS) - 0.5 * math.log(2 * math.pi)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_chunked_equals_unchunked() -> None:
    image, recons = make_data((1, 5, 6, 7), r=25)
    full = kde_log_density(image.float(), recons.float(), EPS, max_bytes=2**40)
    tiny = kde_log_density(image.float(), recons.float(), EPS, max_bytes=1)  # one voxel per chunk
    odd = kde_log_density(image.float(), recons.float(), EPS, max_bytes=3 * 2 * 25 * 4 + 1)  # 3 voxels per chunk
    torch.testing.assert_close(tiny, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(odd, full, rtol=0, atol=1e-6)


def test_chunk_size_respects_budget() -> None:
    r = 300
    for budget in (1, 10_000, 2**20, 256 * 2**20):
        chunk = kde_chunk_size(r, budget)
        assert chunk >= 1
        # two [R, chunk] float32 buffers live at once; they fit whenever one voxel fits
        assert chunk == 1 or 2 * r * chunk * 4 <= budget
        assert 2 * r * (chunk + 1) * 4 > budget
    assert kde_chunk_size(r, 2**20, torch.float64) == kde_chunk_size(r, 2**20) // 2


def test_budget_on_a_pet_sized_volume_is_bounded() -> None:
    """A 3D PET volume x 300 reconstructions: chunks stay within 256 MiB (the inputs themselves are the caller's)."""
    voxels = 176 * 176 * 320
    chunk = kde_chunk_size(300, 256 * 2**20)
    assert chunk < voxels and 2 * 300 * chunk * 4 <= 256 * 2**20


def test_channels() -> None:
    image, recons = make_data((3, 4, 5), r=10)
    per_channel = kde_log_density(image, recons, EPS, channel_reduction="none", dtype=torch.float64)
    assert per_channel.shape == (3, 4, 5)
    for c in range(3):
        single = kde_log_density(image[c : c + 1], recons[:, c : c + 1], EPS, dtype=torch.float64)
        torch.testing.assert_close(single[0], per_channel[c])
    mean = kde_log_density(image, recons, EPS, dtype=torch.float64)
    total = kde_log_density(image, recons, EPS, channel_reduction="sum", dtype=torch.float64)
    assert mean.shape == total.shape == (1, 4, 5)
    torch.testing.assert_close(mean[0], per_channel.mean(0))
    torch.testing.assert_close(total[0], per_channel.sum(0))


def test_identical_reconstructions_use_epsilon() -> None:
    """sigma = 0 -> h = eps; one reconstruction (R = 1) too."""
    recons = torch.full((4, 1, 3), 0.5)
    image = torch.tensor([[0.5, 0.55, 0.6]])
    expected = -0.5 * ((image - 0.5) / EPS) ** 2 - math.log(EPS) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(kde_log_density(image, recons, EPS), expected)
    torch.testing.assert_close(kde_log_density(image, recons[:1], EPS), expected)
    assert silverman_bandwidth(torch.tensor(0.0), 300, EPS).item() == pytest.approx(EPS)


def test_rejects_bad_inputs() -> None:
    image, recons = make_data((1, 4, 4), r=5)
    with pytest.raises(ValueError):
        kde_log_density(image, recons[:, :, :3], EPS)
    with pytest.raises(ValueError):
        kde_log_density(image, recons, EPS, channel_reduction="max")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu_and_stays_in_budget() -> None:
    image, recons = make_data((1, 16, 16, 16), r=300)
    cpu = kde_log_density(image.float(), recons.float(), EPS)
    image_gpu, recons_gpu = image.float().cuda(), recons.float().cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    budget = 2**20
    gpu = kde_log_density(image_gpu, recons_gpu, EPS, max_bytes=budget)
    torch.cuda.synchronize()
    assert gpu.device.type == "cuda"
    # temporaries within the budget, plus the output and the allocator's rounding
    assert torch.cuda.max_memory_allocated() - base <= budget + 4 * image.numel() * 4 + 2**20
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
