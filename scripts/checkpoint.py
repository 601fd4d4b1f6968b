"""Detector checkpoints that know what they were built with, and the one function that reads them.

Every detector checkpoint ILTM training writes (``models/model.pt``, ``<output_dir>/model.pt``,
``iltm/iter_KK/model.pt``) is ``{"model": state_dict, "settings": record}``. MONAI Label and ignite read the
``model`` entry; ``configs/inference.yaml`` reads the record, so that the file alone rebuilds the trained detector and
its preprocessing whatever preset trained it (MONAI Label reads that file alone). The record is flat: config ids
(``image_size``, ``vqvae_def#channels``, ``kde_units#epsilon``) to plain values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from scripts import distributed
from scripts.files import atomic_save

# Settings a checkpoint cannot be used without: its weights' shapes and what its inputs must look like. The others in
# a record (N, M, thresholds, KDE units) are inference choices: adopted by default, free to change.
BINDING = ("spatial_dims", "in_channels", "image_size", "intensity_min", "intensity_max", "spacing",
           "foreground_threshold", "resize_mode", "spatial", "vqvae_def#", "transformer_def#",
           "autoencoder_def#", "classifier_def#", "segmenter_def#")  # fmt: skip
# the networks a record names -> the detector they make and the config layer that builds it
DETECTORS = {
    "vqvae_def": ("the ILTM detector (VQ-VAE + Transformer)", None),
    "autoencoder_def": ("the dense AE/VAE baseline's detector", "configs/baseline_dense.yaml"),
    "classifier_def": (
        "the CutPaste or STKD baseline's detector (STKD: configs/baseline_stkd.yaml after its layer)",
        "configs/baseline_cutpaste.yaml",
    ),
    "segmenter_def": ("the NSA baseline's detector", "configs/baseline_nsa.yaml"),
}
# a baseline network's record prefix -> the layer's section whose settings build it (`dense#variational`, ...)
SECTIONS = {"autoencoder_def": "dense", "segmenter_def": "nsa"}
DATA = ("spatial_dims", "in_channels", "image_size")  # a network's settings that come from the data settings
# record keys of older versions -> today's (0.4.0 renamed the spatial chain's id `resize` to `spatial`)
OLD_KEYS = {"resize": "spatial"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the file and the reason in the message."""


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"kde_units": {"epsilon": 12.75}} -> {"kde_units#epsilon": 12.75}; tuples become lists (JSON-like values)."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}#"))
        else:
            flat[f"{prefix}{key}"] = _plain(value)
    return flat


def _plain(value: Any) -> Any:
    """JSON's types only (tuples -> lists, enums -> str): a weights-only load refuses anything else."""
    return json.loads(json.dumps(value.tolist() if isinstance(value, torch.Tensor) else value, default=str))


def describe(transform: Any) -> list[str]:
    """A transform chain as the names of its transforms: what a record can compare, where values are objects."""
    inner = getattr(transform, "transforms", None)
    if inner is None:
        return [type(transform).__name__]
    return [name for t in inner for name in describe(t)]


def detector_record(detector: nn.Module, data: Mapping[str, Any]) -> dict[str, Any]:
    """The record of a detector: its networks' constructor settings plus the data settings the config passes."""
    record = flatten(data)
    networks = {f"{name}_def": m.settings for name, m in detector.named_children() if hasattr(m, "settings")}
    record.update(
        flatten(networks)
    )  # ILTM: vqvae_def, transformer_def; a baseline (scripts/baselines/): autoencoder_def
    return record


def save_detector(detector: nn.Module, record: Mapping[str, Any], path: str) -> None:
    """Weights and record in one file, written atomically (a kill never leaves a truncated file that looks done)."""
    atomic_save({"model": detector.state_dict(), "settings": dict(record)}, path)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint file, weights only (no code runs), as a dict; errors say which file and what is wrong with it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the checkpoint file is empty (an interrupted copy or download?)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # garbage raises anything from UnpicklingError to UnicodeDecodeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable PyTorch weights file ({first[:200]}); only weights are loaded, never code"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def state_dict(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The weights of a checkpoint: the ``model`` entry (as MONAI Label reads it) or the whole dict (older files)."""
    return checkpoint["model"] if isinstance(checkpoint.get("model"), Mapping) else checkpoint


class TrainedSettings:
    """The record of a checkpoint (empty when there is none), asked for one id at a time with a default.

    ``configs/inference.yaml`` uses it as ``"$@trained('image_size', [64, 64])"``. Reading it memory-maps the file
    and touches no tensor, so it costs little even for a large model.
    """

    def __init__(self, path: str | None) -> None:
        self.path, self.record = path, {}
        if path and os.path.isfile(path) and os.path.getsize(path) > 0:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # unreadable: the checkpoint loader names the problem when it loads the weights
                obj = None
            if isinstance(obj, dict) and isinstance(obj.get("settings"), dict):
                self.record = current_keys(obj["settings"])

    def __call__(self, key: str, default: Any) -> Any:
        return self.record.get(key.replace("::", "#"), default)  # MONAI rewrites '#' in config strings as '::'


def check_dimensions(trained: TrainedSettings, current: Mapping[str, Any]) -> None:
    """A checkpoint's spatial dimensions, channels and image size against the config's, before the settings that
    follow from them are checked: `--spatial_dims 2`, or a 2D preset's image size, with a 3D detector should say so,
    not ask for a 2D (or 3D) image size."""
    differ = mismatches({k: v for k, v in trained.record.items() if k in current}, current)
    if differ:
        raise CheckpointError(
            f"{trained.path}: " + "; ".join(differ) + ". configs/inference.yaml takes these from the checkpoint: drop "
            "them from the command line, or the preset that sets them (or pass the values it was trained with)."
        )


def current_keys(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record written by an older version, with today's keys (:data:`OLD_KEYS`)."""
    return {OLD_KEYS.get(key, key): value for key, value in record.items()}


def mismatches(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Binding settings whose recorded value differs from the current one, as "id: trained X, here Y" lines."""
    recorded, lines = current_keys(recorded), []
    for key in sorted(set(recorded) | set(current)):
        if not key.startswith(BINDING) or key not in recorded or key not in current:
            continue
        network, _, name = key.partition("#")
        if name in DATA and name in recorded and name in current:  # a network's copy of a data setting: said once
            continue
        if _plain(recorded[key]) != _plain(current[key]):
            where = f" (set with --{SECTIONS[network]}#{name})" if network in SECTIONS and name not in DATA else ""
            lines.append(f"{key}: trained with {recorded[key]!r}, this config has {current[key]!r}{where}")
    return lines


def detector_kind(record: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """The kind of detector a record's networks make, as (name, config layer) of :data:`DETECTORS`; None: no network."""
    networks = {key.split("#")[0] for key in record}
    return next((DETECTORS[n] for n in sorted(networks) if n in DETECTORS), None)


def _other_detector(path: str, recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """What to do when a checkpoint holds another kind of detector than the config builds (None: the same kind)."""
    trained, built = detector_kind(recorded), detector_kind(current)
    if trained is None or built is None or trained == built:
        return None
    if trained[1] is None:
        step = f"drop {built[1]} from --config_file"
    else:
        step = f"layer {trained[1]} last in --config_file" + (f" instead of {built[1]}" if built[1] else "")
    return f"{path}: holds {trained[0]}, but this config builds {built[0]}; {step}, as when it was trained."


def load_detector(detector: nn.Module, path: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Loads a detector checkpoint into `detector` after checking that it was built with the same binding settings.

    `data`: the config's data settings (as passed to :func:`detector_record`); None checks the networks only.
    Returns the checkpoint's record ({} for files without one).
    """
    checkpoint = load_checkpoint(path)
    recorded = checkpoint.get("settings") if isinstance(checkpoint.get("settings"), dict) else {}
    current = detector_record(detector, data or {})
    other = _other_detector(path, recorded, current)
    if other:
        raise CheckpointError(other)
    differ = mismatches(recorded, current)
    if differ:
        kind = detector_kind(recorded)
        if kind and recorded.get("method") == "stkd":  # CutPaste's network, STKD's layers
            kind = (kind[0], "configs/baseline_cutpaste.yaml, then configs/baseline_stkd.yaml,")
        way = (
            f"Use the preset and layer it was trained with ({kind[1]} last) with its training's overrides of these "
            "settings (a baseline's own network settings are not taken from its checkpoint)"
            if kind and kind[1]
            else "Use --config_file configs/inference.yaml alone, which takes these settings from the checkpoint, or the "
            "preset it was trained with (--config_file \"['configs/inference.yaml','configs/PRESET.yaml']\") and its "
            "training's overrides of these settings"
        )
        raise CheckpointError(
            f"{path}: built with other settings than this config:\n  "
            + "\n  ".join(differ)
            + f"\n{way}; or drop the overrides that change these settings."
        )
    stage = _one_stage(detector, state_dict(checkpoint))
    if stage:
        raise CheckpointError(
            f"{path}: holds the weights of the detector's {stage} alone, not a whole detector. A training run's "
            "detector is <output_dir>/model.pt (its final iteration) or <output_dir>/iltm/iter_KK/model.pt (iteration "
            "KK); pass one of those."
        )
    try:
        detector.load_state_dict(state_dict(checkpoint))
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        shown = "\n  ".join(_shorten(line) for line in lines[1:6]) + ("\n  ..." if len(lines) > 6 else "")
        raise CheckpointError(
            f"{path}: its weights do not fit this config's detector ({len(lines) - 1} problems), e.g.\n  {shown}\n"
            "Use the config or preset it was trained with."
        ) from None
    return recorded


def _one_stage(detector: nn.Module, weights: Mapping[str, Any]) -> str | None:
    """The part of `detector` whose own state dict `weights` is (``vqvae/vqvae.pt``, ``iltm/iter_KK/transformer.pt``
    of a run): a file a user may well pass for the detector's. None when the weights are a detector's, or unknown."""
    keys = set(weights)
    if not keys or keys & set(detector.state_dict()):
        return None
    heads = {key.split(".")[0] for key in keys}  # sizes may differ: without a record, the detector has default ones
    parts = {name: {key.split(".")[0] for key in part.state_dict()} for name, part in detector.named_children()}
    return next((name for name, own in parts.items() if heads == own), None)


def load_weights(network: nn.Module, weights: Mapping[str, Any], path: str) -> None:
    """``load_state_dict`` that names the file: a run's own weights of another shape come from a rerun with other
    network settings (``--resume True`` keeps the completed steps), which PyTorch would report as a bare size list."""
    try:
        network.load_state_dict(weights)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(
            f"{path}: its weights do not fit this config's {type(network).__name__} ({_shorten(lines[-1], 200)}). "
            "A run resumed with other network settings (--resume True) cannot reuse its completed steps: use a new "
            "--output_dir, or --overwrite True to move this run aside."
        ) from None


def load_for_inference(detector: nn.Module, path: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:func:`load_detector` as inference's and evaluation's first step, so that a torchrun without its overlay, a
    wrong path or a checkpoint of other settings stops them before any input is read and before an earlier run's maps
    are touched."""
    distributed.check_launch("configs/multi_gpu_evaluate.yaml")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{path}: checkpoint not found. Pass --checkpoint with a trained detector (a training run writes "
            "<output_dir>/model.pt, and the README's main job models/model.pt), or train one first: "
            "python -m monai.bundle run training --config_file \"['configs/train.yaml','configs/PRESET.yaml']\"."
        )
    recorded = load_detector(detector, path, data)
    detector.loaded_from = path  # for LoadDetector
    return recorded


def _shorten(line: str, limit: int = 300) -> str:
    """One of PyTorch's load_state_dict lines, which list every key: the first ones and how many there are."""
    return line if len(line) <= limit else f"{line[:limit]}... ({line.count(', ') + 1} keys)"


class LoadDetector:
    """Handler: loads the checkpoint when the engine starts, unless ``run`` already did (:func:`load_for_inference`),
    so that a tool that runs the evaluator by itself does not map with random weights."""

    def __init__(self, load_path: str, network: nn.Module, data: Mapping[str, Any] | None = None) -> None:
        self.load_path, self.network, self.data = load_path, network, data

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if getattr(self.network, "loaded_from", None) != self.load_path:
            load_for_inference(self.network, self.load_path, self.data)
