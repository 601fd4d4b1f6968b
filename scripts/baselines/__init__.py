"""The paper's baselines (Patel et al. 2023, Table 1), trained on the same data and preprocessing as ILTM and scored
by the same evaluation; each is a config layered last on training and evaluation (docs/README.md, "Baselines").

- :mod:`scripts.baselines.dense`: the dense AE and dense VAE of Baur et al. (2018), residual maps.
- :mod:`scripts.baselines.cutpaste`: CutPaste (Li et al. 2021), a Gaussian density of self-supervised patch features.
- :mod:`scripts.baselines.nsa`: NSA (Schlueter et al. 2022), segmentation of Poisson-blended patches.
- :mod:`scripts.baselines.stkd`: STKD, CutPaste self-trained on the images it finds normal, then distilled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from monai.bundle import ConfigParser
from torch import nn

from scripts import distributed
from scripts.checkpoint import CheckpointError, TrainedSettings, detector_record, load_for_inference, save_detector

logger = logging.getLogger(__name__)
__all__ = ["METHODS", "SECTIONS", "Method", "check_layer", "export", "load_checked", "own_overrides", "preset"]


class Method(NamedTuple):
    """A baseline as the sweep runs it: the configs layered last on training and evaluation, their overrides, its
    label in tables and figures, and the config sections its layers define (their ids reach only its runs)."""

    layers: tuple[str, ...]
    overrides: dict[str, Any]
    label: str
    sections: tuple[str, ...]
    dims: tuple[int, ...] = (2, 3)  # the spatial_dims it is defined for


METHODS = {
    "dense_ae": Method(("configs/baseline_dense.yaml",), {"dense#variational": False}, "Dense AE (Baur et al.)",
                       ("dense",)),
    "dense_vae": Method(("configs/baseline_dense.yaml",), {"dense#variational": True}, "Dense VAE (Baur et al.)",
                        ("dense",)),
    "cutpaste": Method(("configs/baseline_cutpaste.yaml",), {}, "CutPaste (Li et al.)", ("cutpaste",), (2,)),
    "nsa": Method(("configs/baseline_nsa.yaml",), {}, "NSA (Schlüter et al.)", ("nsa",)),
    "stkd": Method(("configs/baseline_cutpaste.yaml", "configs/baseline_stkd.yaml"), {},
                   "STKD (self-trained CutPaste)", ("cutpaste", "stkd"), (2,)),
}  # fmt: skip
SECTIONS = tuple(sorted({s for method in METHODS.values() for s in method.sections}))


def own_overrides(overrides: dict[str, Any], method: str | None) -> dict[str, Any]:
    """The overrides a run of `method` (None: ILTM) takes: none of another method's sections."""
    own = METHODS[method].sections if method else ()
    return {k: v for k, v in overrides.items() if k.split("#", 1)[0] not in set(SECTIONS) - set(own)}


def preset(baselines: Mapping[str, Mapping[str, Any]], section: str) -> Mapping[str, Any]:
    """The preset's settings for one baseline (its `baselines` block). A misspelt name stops the run here: it would
    otherwise leave the layer's demo default in place without a word."""
    baselines = baselines or {}  # `baselines:` left empty in a preset
    unknown = sorted(set(baselines) - set(SECTIONS))
    if unknown:
        raise ValueError(f"the preset's `baselines` names {unknown}; the baselines' settings are {list(SECTIONS)}")
    layer = f"configs/baseline_{section}.yaml"
    known = ConfigParser.load_config_file(os.path.join(os.path.dirname(__file__), "..", "..", layer))[section]
    own = baselines.get(section) or {}
    unknown = sorted(set(own) - set(known))
    if unknown:
        raise ValueError(f"the preset's `baselines#{section}` names {unknown}, which {layer} does not have; "
                         f"its settings are {sorted(known)}")  # fmt: skip
    return own


def export(detector: nn.Module, data: Mapping[str, Any], path: str, method: str | None = None) -> str:
    """The trained baseline as a detector checkpoint (weights and settings record), the file inference.yaml loads.
    `method` is recorded too: CutPaste's and STKD's detectors are the same network, told apart by nothing else."""
    if distributed.is_main():
        save_detector(detector, {**detector_record(detector, data), **({"method": method} if method else {})}, path)
        logger.info(f"baseline: detector written to {path}")
    distributed.barrier()
    return path


def check_layer(method: str, layer: str) -> None:
    """Before any work: the baseline's layers came last (evaluate.yaml after them replaced their evaluation record,
    and the run failed deep in MONAI)."""
    if method == "iltm":
        raise ValueError(f"configs/evaluate.yaml came after {layer} and replaced the baseline's evaluation: put "
                         "configs/evaluate.yaml before the baseline's layers, which come last, e.g. --config_file "
                         f"\"['configs/inference.yaml','configs/PRESET.yaml','configs/evaluate.yaml','{layer}']\"")  # fmt: skip


def load_checked(network: nn.Module, checkpoint: str, data: Mapping[str, Any], method: str) -> Mapping[str, Any]:
    """Inference's and evaluation's first step for a baseline: its checkpoint holds this method's detector (an STKD
    model evaluated under CutPaste's layer alone was scored, and recorded, as CutPaste's; checkpoints exported since
    0.7.7 record their method, older ones cannot be told apart), then :func:`scripts.checkpoint.load_for_inference`."""
    trained = TrainedSettings(checkpoint).record.get("method") if os.path.isfile(checkpoint) else None
    if trained in METHODS and trained != method:
        wanted, built = METHODS[trained], METHODS[method].label if method in METHODS else method
        layers = ",".join(f"'{name}'" for name in wanted.layers)
        flags = "".join(f" --{k} {v}" for k, v in wanted.overrides.items())
        raise CheckpointError(f"{checkpoint}: holds the {wanted.label} detector ({trained}), but this config builds "
                              f"{built}'s ({method}): layer {layers} last{flags and ' and pass' + flags}, as when it "
                              "was trained")  # fmt: skip
    return load_for_inference(network, checkpoint, data)
