"""Timings of the anomaly-map pipeline: KV-cached vs naive healing, KDE, whole map per image (random weights).

    python -m scripts.benchmark                       # CPU (and CUDA when present), paper-sized defaults
    python -m scripts.benchmark --device cpu --num-samples 8 --cases 2d --json bench.json

Healing is timed at ~5 % flagged tokens placed as a few compact clusters in the latent grid (lesions and defects are
blobs, not salt-and-pepper). The cost model (docs/README.md, "Benchmark") predicts the cached/naive ratio from token
counts alone: naive feeds ``N * sum_k (f_k + 1)`` tokens, cached ``f_1 + 1 + N * (f_K - f_1)``; both are printed next to
the measured times. Random weights are enough: the cost depends on shapes and flag positions, not on values. The
whole-map timing uses the detector's own flags, with the resampling threshold set to the 5 % quantile of the token
probabilities of that image (a random Transformer has no meaningful default threshold).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from unittest import mock

import torch

import scripts.detector
from scripts.detector import AnomalyDetector
from scripts.healing import LatentSequencer, heal, heal_naive, token_log_likelihood
from scripts.kde import kde_log_density
from scripts.transformer import MaskedTransformer, autocast
from scripts.vqvae import DropoutVQVAE


def build_vqvae(spatial_dims: int, levels: int, channels: int, codebook: int, embedding_dim: int) -> DropoutVQVAE:
    """A VQ-VAE with ``levels`` stride-2 stages (latent = image / 2**levels), as in the bundle's configs."""
    return DropoutVQVAE(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=1,
        channels=(channels,) * levels,
        num_res_channels=(channels,) * levels,
        num_res_layers=1,
        downsample_parameters=((2, 4, 1, 1),) * levels,
        upsample_parameters=((2, 4, 1, 1, 0),) * levels,
        num_embeddings=codebook,
        embedding_dim=embedding_dim,
    )


def cluster_flags(grid: Sequence[int], fraction: float, clusters: int, generator: torch.Generator) -> torch.Tensor:
    """[*grid] bool: ``clusters`` disjoint cubes/squares covering about ``fraction`` of the tokens, at random places."""
    total = math.prod(grid)
    side = max(1, round((fraction * total / clusters) ** (1 / len(grid))))
    flags = torch.zeros(grid, dtype=torch.bool)
    for _ in range(clusters):
        for _attempt in range(1000):  # reject overlapping placements so that the flagged count is as asked
            corner = [int(torch.randint(0, g - side + 1, (1,), generator=generator)) for g in grid]
            blob = tuple(slice(c, c + side) for c in corner)
            if not flags[blob].any():
                break
        flags[blob] = True
    return flags


def timed_spread(
    fn: Callable[[], object], device: torch.device, repeats: int
) -> tuple[tuple[float, float, float], object]:
    """(median, min, max) wall time over ``repeats`` calls, and the last result."""
    runs = [timed(fn, device) for _ in range(max(1, repeats))]
    seconds = [s for s, _ in runs]
    return (statistics.median(seconds), min(seconds), max(seconds)), runs[-1][1]


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Wall time of ``fn()`` (synchronised on CUDA) and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def bench_healing(
    transformer: MaskedTransformer,
    seq: torch.Tensor,
    flags: torch.Tensor,
    num_samples: int,
    amp: bool,
    naive: bool,
    repeats: int = 1,
) -> dict[str, float]:
    """Cached and naive healing of the same flags and seed (median of ``repeats`` runs each)."""
    device = seq.device
    positions = torch.nonzero(flags).flatten().tolist()
    first, last = positions[0], positions[-1]
    naive_tokens = num_samples * sum(p + 1 for p in positions)
    cached_tokens = first + 1 + num_samples * (last - first)
    with autocast(device, amp):
        heal(transformer, seq, flags, 2)  # warm-up (kernels, allocator)
        (cached_s, cached_min, cached_max), cached = timed_spread(
            lambda: heal(transformer, seq, flags, num_samples, generator=torch.Generator(device).manual_seed(0)),
            device,
            repeats,
        )
        result = {
            "flagged": len(positions),
            "flagged_percent": 100.0 * len(positions) / flags.numel(),
            "span": last - first + 1,
            "cached_s": cached_s,
            "cached_min_s": cached_min,
            "cached_max_s": cached_max,
            "cached_tokens": cached_tokens,  # the floor: tokens any exact healing must feed through the Transformer
            "cached_tokens_per_s": cached_tokens / cached_s,
            "naive_tokens": naive_tokens,
            "token_ratio": naive_tokens / cached_tokens,
        }
        if naive:
            (naive_s, naive_min, naive_max), reference = timed_spread(
                lambda: heal_naive(
                    transformer, seq, flags, num_samples, generator=torch.Generator(device).manual_seed(0)
                ),
                device,
                repeats,
            )
            result.update(naive_s=naive_s, naive_min_s=naive_min, naive_max_s=naive_max, ratio=naive_s / cached_s,
                          identical=bool(torch.equal(cached, reference)))  # fmt: skip
    return result


def bench_kde(image: torch.Tensor, num_reconstructions: int, max_bytes: int, repeats: int = 1) -> dict[str, float]:
    """KDE over R reconstructions of one image [C, *S] (random values: the cost does not depend on them): time and
    throughput, in kernel evaluations (R per voxel and channel, the floor of any exact KDE) per second."""
    g = torch.Generator(image.device).manual_seed(0)
    recons = image + 0.05 * torch.randn((num_reconstructions, *image.shape), generator=g, device=image.device)
    kde_log_density(image, recons[:2], max_bytes=max_bytes)  # warm-up
    (median, low, high), _ = timed_spread(
        lambda: kde_log_density(image, recons, max_bytes=max_bytes), image.device, repeats
    )
    evaluations = num_reconstructions * image.numel()
    return {"kde_s": median, "kde_min_s": low, "kde_max_s": high, "kde_evals": evaluations,
            "kde_evals_per_s": evaluations / median}  # fmt: skip


@contextmanager
def stage_timers(detector: AnomalyDetector, device: torch.device) -> Iterator[dict[str, float]]:
    """Accumulate the time the detector spends healing, decoding (what the M decodes of a latent share: the decoder
    before its dropout; and the last layer, which gives a latent's M decodes in one pass) and in the KDE."""
    totals = {"heal": 0.0, "decode_shared": 0.0, "decode_dropout": 0.0, "kde": 0.0}

    def wrap(name: str, fn: Callable) -> Callable:
        def timed_fn(*args, **kwargs):
            seconds, result = timed(lambda: fn(*args, **kwargs), device)
            totals[name] += seconds
            return result

        return timed_fn

    with (
        mock.patch.object(scripts.detector, "heal", wrap("heal", scripts.detector.heal)),
        mock.patch.object(scripts.detector, "kde_log_density", wrap("kde", scripts.detector.kde_log_density)),
        mock.patch.object(detector.vqvae, "decode_shared", wrap("decode_shared", detector.vqvae.decode_shared)),
        mock.patch.object(detector.vqvae, "decode_many", wrap("decode_dropout", detector.vqvae.decode_many)),
    ):
        yield totals


@contextmanager
def as_in_version_0_2(detector: AnomalyDetector) -> Iterator[None]:
    """The map as versions up to 0.2.0 computed it, for the before/after comparison: each of the R reconstructions
    through the whole decoder in batches of `decode_batch_size` (same dropout masks in the same order, same images),
    and healing steps that run every position through every Transformer block (no ``last_only``)."""

    def decode(latents: torch.Tensor, num_decodes: int, image_shape: tuple[int, ...]) -> torch.Tensor:
        every = latents.repeat_interleave(num_decodes, dim=0)
        size = detector.decode_batch_size
        return torch.cat(
            [detector.vqvae.decode_samples(every[i : i + size]).float() for i in range(0, len(every), size)]
        )

    forward = detector.transformer.forward

    def every_position(*args, last_only: bool = False, **kwargs) -> torch.Tensor:
        logits = forward(*args, **kwargs)
        return logits[:, -1:] if last_only else logits

    with mock.patch.object(detector, "_decode", decode), mock.patch.object(
        detector.transformer, "forward", every_position
    ):
        yield


def bench_map(
    detector: AnomalyDetector, image: torch.Tensor, flag_fraction: float, repeats: int = 1, before: bool = True
):
    """Whole anomaly map of one image, the detector flagging ``flag_fraction`` of its tokens: median, min and max of
    ``repeats`` runs, a breakdown of the last one, and (``before``) the same map computed as 0.2.0 did, in the same run.

    An ILTM mask pass runs this map once per training image (with the mask settings' N and M), so its time per image
    is this one's."""
    with torch.no_grad():
        indices = detector.vqvae.index_quantize(image)
        seq = detector.sequencer(tuple(indices.shape[1:])).to_sequence(indices)
        probs = token_log_likelihood(detector.transformer.eval(), seq).exp().flatten()
    detector.resample_threshold = float(torch.quantile(probs.float(), flag_fraction)) * (1 + 1e-6)
    detector.infer(image)  # warm-up: CUDA kernels and their tuning, allocator, caches
    with stage_timers(detector, image.device) as stages:
        (median, low, high), out = timed_spread(lambda: detector.infer(image), image.device, repeats)
        stages = {name: value / max(1, repeats) for name, value in stages.items()}
    result = {
        "map_s": median,
        "map_min_s": low,
        "map_max_s": high,
        "map_flagged": int(out["num_flagged"][0]),
        "map_R": detector.num_samples * detector.num_decodes,
        **{f"map_{name}_s": value for name, value in stages.items()},
    }
    if before:
        with as_in_version_0_2(detector):
            detector.infer(image)  # warm-up, as above
            (b_median, b_low, b_high), old = timed_spread(lambda: detector.infer(image), image.device, repeats)
        result.update(map_before_s=b_median, map_before_min_s=b_low, map_before_max_s=b_high,
                      map_speedup=b_median / median,
                      map_same=bool(torch.allclose(old["score"], out["score"], rtol=1e-4, atol=1e-3)),
                      map_max_difference=float((old["score"] - out["score"]).abs().max()))  # fmt: skip
    return result


def run_case(case: str, device: torch.device, args: argparse.Namespace) -> dict[str, object]:
    spatial_dims = 2 if case == "2d" else 3
    size = args.size_2d if spatial_dims == 2 else args.size_3d
    torch.manual_seed(0)
    vqvae = build_vqvae(spatial_dims, args.levels, args.vqvae_channels, args.codebook, args.embedding_dim)
    vqvae = vqvae.to(device).eval()
    image = torch.rand((1, 1, *([size] * spatial_dims)), device=device)
    with torch.no_grad():
        grid = tuple(vqvae.index_quantize(image).shape[1:])
    seq_len = math.prod(grid)
    transformer = MaskedTransformer(
        args.codebook + 1, seq_len, embed_dim=args.embed_dim, num_layers=args.layers, num_heads=args.heads
    )
    transformer = transformer.to(device).eval()
    sequencer = LatentSequencer(grid, transformer.bos_id)
    g = torch.Generator().manual_seed(args.seed)
    codes = torch.randint(0, args.codebook, (1, *grid), generator=g).to(device)
    seq = sequencer.to_sequence(codes)[0]
    flags = sequencer.to_tokens(cluster_flags(grid, args.flag_fraction, args.clusters, g)[None])[0].to(device)

    row: dict[str, object] = {"case": case, "device": str(device), "image": [size] * spatial_dims, "latent": grid}
    row["tokens"] = seq_len
    row["N"] = args.num_samples
    row.update(bench_healing(transformer, seq, flags, args.num_samples, args.amp, not args.skip_naive, args.repeats))
    row["kde_R"] = args.kde_reconstructions or args.num_samples * args.num_decodes
    row.update(bench_kde(image[0], row["kde_R"], args.kde_max_bytes, args.repeats))
    if not args.skip_map:
        detector = AnomalyDetector(
            vqvae,
            transformer,
            num_samples=args.num_samples,
            num_decodes=args.num_decodes,
            kde_max_bytes=args.kde_max_bytes,
            decode_batch_size=args.decode_batch_size,
            amp=args.amp,
        )
        row.update(bench_map(detector, image, args.flag_fraction, args.repeats, not args.skip_before))
    return row


def print_table(rows: list[dict[str, object]]) -> None:
    columns = [
        ("case", "{}"),
        ("device", "{}"),
        ("tokens", "{}"),
        ("N", "{}"),
        ("flagged", "{}"),
        ("span", "{}"),
        ("cached_s", "{:.3f}"),
        ("naive_s", "{:.3f}"),
        ("ratio", "{:.1f}x"),
        ("token_ratio", "{:.1f}x"),
        ("cached_tokens_per_s", "{:.0f}"),
        ("identical", "{}"),
        ("kde_R", "{}"),
        ("kde_s", "{:.3f}"),
        ("kde_evals_per_s", "{:.2e}"),
        ("map_R", "{}"),
        ("map_flagged", "{}"),
        ("map_s", "{:.2f}"),
        ("map_min_s", "{:.2f}"),
        ("map_max_s", "{:.2f}"),
        ("map_before_s", "{:.2f}"),
        ("map_speedup", "{:.2f}x"),
        ("map_same", "{}"),
        ("map_heal_s", "{:.2f}"),
        ("map_decode_shared_s", "{:.2f}"),
        ("map_decode_dropout_s", "{:.2f}"),
        ("map_kde_s", "{:.2f}"),
    ]
    cells = [[name for name, _ in columns]]
    cells += [[fmt.format(row[name]) if name in row else "-" for name, fmt in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def _dashed(arg: str) -> str:
    """--size_2d=64 -> --size-2d=64: the other scripts spell their flags with underscores (fire), so both work."""
    name, eq, value = arg.partition("=")
    return name.replace("_", "-") + eq + value if arg.startswith("--") else arg


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = CPU, and CUDA if present")
    p.add_argument("--cases", default="2d,3d", help="comma-separated: 2d, 3d")
    p.add_argument("--size-2d", type=int, default=256, help="2D image side (latent = side / 2**levels)")
    p.add_argument("--size-3d", type=int, default=96, help="3D volume side")
    p.add_argument("--levels", type=int, default=3, help="VQ-VAE stride-2 stages")
    p.add_argument("--vqvae-channels", type=int, default=128, help="VQ-VAE width: channels of every stage (one number)")
    p.add_argument("--codebook", type=int, default=256, help="codebook size (Transformer vocabulary - 1)")
    p.add_argument("--embedding-dim", type=int, default=64, help="codebook vector length")
    p.add_argument("--embed-dim", type=int, default=256, help="Transformer width")
    p.add_argument("--layers", type=int, default=8, help="Transformer depth")
    p.add_argument("--heads", type=int, default=8, help="Transformer attention heads")
    p.add_argument("--num-samples", type=int, default=60, help="N healed samples per image")
    p.add_argument("--num-decodes", type=int, default=5, help="M dropout decodes per healed latent")
    p.add_argument("--flag-fraction", type=float, default=0.05)
    p.add_argument("--clusters", type=int, default=3, help="flagged tokens form this many blobs")
    p.add_argument("--kde-reconstructions", type=int, default=300, help="R for the KDE timing (0 = N * M)")
    p.add_argument("--kde-max-bytes", type=int, default=256 * 2**20)
    p.add_argument("--decode-batch-size", type=int, default=30)
    p.add_argument("--no-amp", dest="amp", action="store_false", help="float32 on CUDA too")
    p.add_argument("--skip-naive", action="store_true", help="the naive path can take minutes at paper scale on CPU")
    p.add_argument("--skip-map", action="store_true", help="skip the whole-map timing")
    p.add_argument("--skip-before", action="store_true", help="skip the map computed as in 0.2.0 (for comparison)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=3, help="median (and min-max) of this many runs of each timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows (and the settings) to this JSON file")
    args = p.parse_args([_dashed(a) for a in (sys.argv[1:] if argv is None else argv)])
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or set(cases) - {"2d", "3d"}:
        p.error(f"--cases {args.cases!r}: comma-separated 2d and 3d")
    if not 0.0 < args.flag_fraction < 1.0:
        p.error(f"--flag-fraction {args.flag_fraction}: a fraction of the tokens, strictly between 0 and 1")
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: at least 1")
    positive = ("size_2d", "size_3d", "levels", "vqvae_channels", "codebook", "embedding_dim", "embed_dim", "layers",
                "heads", "num_samples", "num_decodes", "clusters", "kde_max_bytes", "decode_batch_size")  # fmt: skip
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: at least 1")
    if args.kde_reconstructions < 0:
        p.error(f"--kde-reconstructions {args.kde_reconstructions}: 0 (= N * M) or more")
    for case, side in (("2d", args.size_2d), ("3d", args.size_3d)):
        if case in cases and (side % 2**args.levels or side // 2**args.levels < 2):
            p.error(f"--size-{case} {side}: a multiple of 2**levels = {2**args.levels} with at least 2 tokens a side")
    if args.embed_dim % args.heads:
        p.error(f"--embed-dim {args.embed_dim}: a multiple of --heads {args.heads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use auto or cpu)")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: its folder does not exist (checked now, not after the benchmark)")
    args.cases = ",".join(cases)
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    settings["amp"] = args.amp and "cuda" in devices[args.device]  # autocast acts on CUDA only: a CPU run is float32
    print("settings:", json.dumps(settings), f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    rows = []
    for name in devices[args.device]:
        for case in args.cases.split(","):
            rows.append(run_case(case.strip(), torch.device(name), args))
            print_table(rows[-1:])
    print("\nsummary")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "rows": rows}, f, indent=2, default=str)
    return rows


if __name__ == "__main__":
    main()
