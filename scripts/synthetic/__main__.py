"""``python -m scripts.synthetic make_2d|make_3d|ensure_dataset --out_dir ...``; ``noise_floor`` (3D first-stage fidelity
of a perfect denoiser); ``mask_recall`` (which recurring anomalies an ILTM run's token masks caught)."""

from scripts.cli import fire_main, quiet
from scripts.synthetic import ensure_dataset, make_2d, make_3d
from scripts.synthetic.mask_recall import mask_recall
from scripts.synthetic.pet import noise_floor

fire_main(
    {
        "make_2d": make_2d,
        "make_3d": make_3d,
        "ensure_dataset": ensure_dataset,
        "noise_floor": noise_floor,
        "mask_recall": quiet(mask_recall),
    }
)
