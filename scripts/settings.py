"""The domain of every setting a user is likely to change, checked when a run starts, before any data or training.

Without these checks a wrong value surfaces late and far from its cause: ``--num_samples abc`` as a ``TypeError``
inside healing, ``--image_size "[0,0]"`` after the VQ-VAE has trained. The configs pass the values they use
(``detector_settings`` with ``run_settings`` or ``checked_settings``) to :func:`check_settings`, which reports every problem at once, each with its id.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from scripts.checkpoint import flatten
from scripts.tokens import mask_spec

logger = logging.getLogger(__name__)


def _int(low: int | None = None) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return "a whole number"
        return f">= {low}" if low is not None and v < low else None

    return check


def _odd(v: Any) -> str | None:
    return (
        None if _int(1)(v) is None and v % 2 == 1 else "an odd whole number >= 1 (a neighbourhood of tokens: 1, 3, 5)"
    )


def _float(low: float | None = None, high: float | None = None, low_open=True, high_open=True):
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return "a finite number"
        if low is not None and (v <= low if low_open else v < low):
            return f"{'>' if low_open else '>='} {low}"
        if high is not None and (v >= high if high_open else v > high):
            return f"{'<' if high_open else '<='} {high}"
        return None

    return check


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "True or False (capitalised on the command line)"


def _choice(*options: Any) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"one of {', '.join(map(repr, options))}"


def _spacing(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(s, (int, float)) and s > 0 for s in v):
        return "None or a list of positive spacings in mm, e.g. [4.0, 4.0, 4.0]"
    return None


def _initial_masks(v: Any) -> str | None:
    if v is None or v == "":
        return None
    path = mask_spec(v)[1] if isinstance(v, str) else None
    if path is None:
        return 'None, "labels", a token mask file, or "labels&FILE" / "labels|FILE"'
    return f"a token mask file that exists ({path} not found)" if path and not os.path.isfile(path) else None


def _optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def optional(v: Any) -> str | None:
        wrong = None if v is None else check(v)
        return wrong and f"None or {wrong}"

    return optional


def _sizes(v: Any) -> str | None:
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(s, int) and not isinstance(s, bool) for s in v):
        return "a list of whole numbers, e.g. [64, 64]"
    return "positive sizes" if min(v) < 1 else None


def _device(v: Any) -> str | None:
    """`--device cuda` on a machine without CUDA fails deep in PyTorch ("Torch not compiled with CUDA enabled")."""
    try:
        device = torch.device(v)
    except (RuntimeError, TypeError):
        return "a torch device, e.g. 'cpu' or 'cuda:0'"
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        seen = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        return f"a device this machine has (torch {torch.__version__} sees {seen}; leave --device out for the default)"
    return None


# id -> check; a check returns None or what the value must be
DOMAINS: dict[str, Callable[[Any], str | None]] = {
    "spatial_dims": _choice(2, 3),
    "device": _device,
    "spacing": _spacing,
    "foreground_threshold": _optional(_float()),
    "resize_mode": _choice("resize", "pad_crop"),
    "in_channels": _int(1),
    "image_size": _sizes,
    "intensity_min": _float(),
    "intensity_max": _float(),
    "label_threshold": _float(),
    "max_clipped_fraction": _float(0.0, 1.0, low_open=False, high_open=False),
    "seed": _int(0),
    "num_workers": _int(0),
    "num_samples": _int(1),
    "num_decodes": _int(1),
    "resample_threshold": _float(0.0, 1.0),
    "kde_units#intensity_scale": _float(0.0),
    "kde_units#epsilon": _float(0.0),
    "kde_units#density_threshold": _float(0.0),
    "restrict_to_flags": _bool,
    "flag_neighbourhood": _odd,
    "vqvae#epochs": _int(1),
    "vqvae#batch_size": _int(1),
    "vqvae#lr": _float(0.0),
    "vqvae#val_interval": _int(1),
    "transformer#epochs": _int(1),
    "transformer#batch_size": _int(1),
    "transformer#lr": _float(0.0),
    "transformer#weight_decay": _float(0.0, low_open=False),
    "transformer#val_interval": _int(1),
    "iltm#threshold_decay": _float(0.0, 1.0, low_open=False),
    "iltm#fixed_threshold": _bool,
    "iltm#max_iterations": _int(0),
    "iltm#min_iterations": _int(0),
    "iltm#stop_tolerance": _float(0.0, low_open=False),
    "iltm#downsample_rule": _choice("any", "fraction"),
    "iltm#downsample_fraction": _float(0.0, 1.0, high_open=False),
    "iltm#warm_start": _bool,
    "iltm#mask_batch_size": _int(1),
    "iltm#mask_num_samples": _int(1),
    "iltm#mask_num_decodes": _int(1),
    "iltm#mask_resample_threshold": _float(0.0, 1.0),
    "iltm#mask_density_threshold": _float(0.0),
    "iltm#mask_restrict_to_flags": _bool,
    "iltm#initial_masks": _initial_masks,
    "save_maps": _bool,
    "save_overlays": _bool,
    "invert_maps": _bool,
    "resume_maps": _bool,
}


class SettingError(ValueError):
    """Settings outside their domain, each named by its config id."""


def check_settings(*settings: Mapping[str, Any]) -> None:
    """Raises one :class:`SettingError` listing every setting of `settings` (nested dicts or flat ids, merged) that is
    outside its domain; ids without a known domain pass."""
    flat = {k: v for part in settings for k, v in flatten(part).items()}
    problems = []
    for key, value in flat.items():
        check = DOMAINS.get(key)
        wrong = check(value) if check else None
        if wrong:
            problems.append(f"{key} must be {wrong}, got {value!r}")
    spatial_dims, size = flat.get("spatial_dims"), flat.get("image_size")
    if spatial_dims in (2, 3) and isinstance(size, (list, tuple)) and len(size) != spatial_dims:
        hint = ", or layer configs/demo3d.yaml or configs/autopet.yaml" if spatial_dims == 3 else ""
        example = [64] * 2 + [128] * (spatial_dims - 2)
        problems.append(
            f"image_size must have spatial_dims = {spatial_dims} sizes, got {size!r}: set --image_size too "
            f'(e.g. "{example}"){hint}'
        )
    low, high = flat.get("intensity_min"), flat.get("intensity_max")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and not high > low:
        problems.append(f"intensity_max ({high!r}) must be above intensity_min ({low!r})")
    if problems:
        raise SettingError("settings outside their domain:\n  " + "\n  ".join(problems))
    least, most = flat.get("iltm#min_iterations"), flat.get("iltm#max_iterations")
    if isinstance(least, int) and isinstance(most, int) and least > most:
        logger.warning(
            f"iltm#min_iterations ({least}) is above iltm#max_iterations ({most}): ILTM trains at most {most}; "
            "set --iltm#min_iterations too"
        )


def check_grid(image_size: list[int], strides: list) -> None:
    """Sizes the encoder cannot halve evenly fail deep in the first training step (a shape mismatch); stop here.

    `strides`: one per encoder stage, an int or one per dimension (``network_strides``: the VQ-VAE's or a baseline's).
    """
    factors = [[s] * len(image_size) if isinstance(s, int) else list(s) for s in strides]
    per_dim = [math.prod(f[d] for f in factors) for d in range(len(image_size))]
    if any(size % factor for size, factor in zip(image_size, per_dim)):
        fits = [max(f, round(size / f) * f) for size, f in zip(image_size, per_dim)]
        factor = per_dim[0] if len(set(per_dim)) == 1 else per_dim
        raise SettingError(
            f"image_size must be a multiple of {factor} in every dimension (the network's strides divide each side "
            f'by {factor}), got {list(image_size)}; e.g. --image_size "{fits}"'
        )
