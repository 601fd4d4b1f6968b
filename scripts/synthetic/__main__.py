"""``python -m scripts.synthetic make_2d|make_3d|ensure_dataset --out_dir ...``"""

import fire

from scripts.synthetic import ensure_dataset, make_2d, make_3d

fire.Fire({"make_2d": make_2d, "make_3d": make_3d, "ensure_dataset": ensure_dataset})
