"""``python -m scripts.synthetic make_2d|make_3d|ensure_dataset --out_dir ...``; ``noise_floor`` (3D first-stage fidelity
of a perfect denoiser); ``mask_recall`` (which recurring anomalies an ILTM run's token masks caught)."""

import fire

from scripts.synthetic import ensure_dataset, make_2d, make_3d
from scripts.synthetic.mask_recall import mask_recall
from scripts.synthetic.pet import noise_floor


def _mask_recall(run_dir: str, data_dir: str, iteration: int | None = None) -> None:
    """Prints, per group of training images with the same anomalies, the recall of the run's token masks."""
    mask_recall(run_dir, data_dir, iteration)


commands = {"make_2d": make_2d, "make_3d": make_3d, "ensure_dataset": ensure_dataset, "noise_floor": noise_floor}
fire.Fire({**commands, "mask_recall": _mask_recall})
