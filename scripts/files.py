"""Files written so that a kill never leaves half of one: through a temporary file renamed into place.

A failed write (a full disk, a read-only folder) names the file instead of PyTorch's `basic_ios::clear: iostream error`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch


def _replace(path: str, write) -> None:
    tmp = f"{path}.tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f"{path}: could not be written ({e}); is the disk full or the folder read-only?") from e


def check_target(path: str | None, setting: str) -> None:
    """A file a run writes only at its end (the exported detector), checked before the run's work: a path that is a
    folder, or under a file or an unwritable folder, would otherwise stop the run after all of its training."""
    if not path:
        return
    setting = setting.replace("::", "#")  # MONAI's parser rewrites "#" in a config expression, strings included
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OSError(f"{path}: {setting} cannot be written there ({e}); set --{setting} to a writable file") from None
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        why = "it is a folder" if os.path.isdir(path) else f"{folder} is not writable"
        raise OSError(f"{path}: {setting} cannot be written there ({why}); set --{setting} to a writable file")


def atomic_save(obj: Any, path: str) -> None:
    """`torch.save`, atomically."""
    _replace(path, lambda tmp: torch.save(obj, tmp))


def _clean(value: Any) -> Any:
    """NaN and infinities as null (strict JSON readers reject them), numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str, obj: Any, indent: int = 2) -> str:
    """JSON, atomically; the same object always gives the same bytes, NaN as null. Returns `path`."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(_clean(obj), f, indent=indent, allow_nan=False)
            f.write("\n")

    _replace(path, write)
    return path
