"""Inference glue for configs/inference.yaml: the inputs, the inferer, and what `pred` becomes.

The detector (``network_def``) already returns the score map; what is here only moves maps between MONAI's engine and
disk: the input list (datalist section or a folder, each file checked first), an inferer that keeps the input's
metadata on the map (so that MONAI's writers and ``Invertd`` know the file and its affine), and the label map that
`pred` becomes. Overlays: :mod:`scripts.overlays`; metrics of a labelled set: :mod:`scripts.evaluation`.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from fnmatch import fnmatch
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import create_file_basename
from monai.inferers import Inferer
from monai.transforms import MapTransform

from scripts import distributed
from scripts.data import DataError, listing, load_datalist
from scripts.detector import segment
from scripts.files import write_json
from scripts.runs import file_table

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def input_files(
    folder: str | None,
    datalist: str | None,
    dataset_dir: str,
    section: str = "test",
    labels: str = "auto",
    root: str | None = None,
    pattern: str = "*",
) -> list[dict]:
    """The images to process: every image file in `folder` (sorted) whose name matches `pattern` when given, else a
    datalist section.

    `labels` as in :func:`scripts.data.load_datalist` ("require" for evaluation, "auto" for plain inference).
    `root`: the folder output names are relative to (MONAI's `data_root_dir`; default `folder` or `dataset_dir`).
    """
    if not folder:
        listed = load_datalist(datalist, dataset_dir, section, labels)
        files = list({json.dumps(e, sort_keys=True, default=str): e for e in listed}.values())
        if len(files) < len(listed):  # e.g. a training section that prepare_mvtec or prepare_autopet over-sampled
            logger.info(f"{datalist}: {len(listed) - len(files)} of the {len(listed)} entries of {section!r} repeat an "
                        "earlier one; each image is mapped once")  # fmt: skip
    else:
        if os.path.isfile(folder):
            raise DataError(
                f"{folder}: a file, not a folder; to map this one image pass its folder and its name: "
                f"--folder {os.path.dirname(folder) or '.'} --folder_pattern {os.path.basename(folder)}"
            )
        if not os.path.isdir(folder):
            raise DataError(f"{folder}: input folder not found")
        if labels == "require":
            raise DataError(f"{folder}: evaluation needs a label for every image, and --folder gives images alone: "
                            "evaluate a datalist section whose entries have `label` (--datalist, --data_section), or "
                            "map the folder with configs/inference.yaml alone")  # fmt: skip
        names = _images(folder, pattern)
        subs = [os.path.join(folder, sub) for sub in sorted(os.listdir(folder)) if not sub.startswith((".", "__"))]
        deeper = [os.path.basename(sub) for sub in subs if os.path.isdir(sub) and _images(sub, pattern)]
        shown = ", ".join(deeper[:5]) + (", ..." if len(deeper) > 5 else "")
        if not names:
            matching = f" matching folder_pattern {pattern!r}" if pattern != "*" else ""
            inside = f"; its subfolders {shown} have some: pass one as --folder, or a datalist" if deeper else ""
            nested = "" if deeper else _deeper(folder, pattern)
            raise DataError(f"{folder}: no image files{matching} ({', '.join(IMAGE_EXTENSIONS)}){inside}{nested}")
        files = [{"image": os.path.join(folder, n)} for n in names]
        if deeper:
            logger.warning(f"{folder}: the images in its subfolders ({shown}) are not processed, only the folder's own; "
                           "pass a subfolder as --folder, or a datalist")  # fmt: skip
    check_inputs(files, root or folder or dataset_dir, "--folder_pattern (e.g. '*.jpg')" if folder else "")
    return files


def _deeper(folder: str, pattern: str, levels: int = 4) -> str:
    """Where images lie further down (autoPET's PETCT_<subject>/<study>/SUV.nii.gz), as advice; "" when none do."""
    for d, subs, _ in os.walk(folder):
        depth = os.path.relpath(d, folder).count(os.sep) + 1
        subs[:] = sorted(s for s in subs if not s.startswith((".", "__"))) if depth < levels else []
        names = _images(d, pattern) if d != folder else []
        if names:
            example = os.path.relpath(os.path.join(d, names[0]), folder)
            return (f"; images lie deeper (e.g. {example}): pass a datalist (python -m scripts.prepare_autopet makes "
                    "one for an autoPET folder), or one of those folders, with --folder_pattern to pick one kind of "
                    "file there (e.g. 'SUV*' for autoPET's PET images)")  # fmt: skip
    return ""


def _images(folder: str, pattern: str = "*") -> list[str]:
    """The image files directly in `folder` whose names match `pattern`, sorted; hidden ones (`.DS_Store`,
    `._x.png`) left out."""
    return sorted(n for n in os.listdir(folder)
                  if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".") and fnmatch(n, pattern))  # fmt: skip


def unreadable(path: str) -> str | None:
    """Why `path` cannot be an input, from what is cheap to check before any work (None: nothing found)."""
    if not os.path.isfile(path):
        return "not found"
    if os.path.getsize(path) == 0:
        return "empty file"
    lower = path.lower()
    try:
        if lower.endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
            from PIL import Image

            with Image.open(path) as image:
                image.verify()  # reads the file's structure and checksums, decodes no pixels
        elif lower.endswith(".nii"):
            import nibabel as nib

            image = nib.load(path)
            needed = int(image.dataobj.offset) + int(np.prod(image.shape)) * image.get_data_dtype().itemsize
            if os.path.getsize(path) < needed:
                return f"truncated NIfTI ({os.path.getsize(path)} of {needed} bytes)"
        elif lower.endswith(".nii.gz"):
            import nibabel as nib

            nib.load(path)  # the header
    except Exception as e:  # noqa: BLE001 - whatever the reader says is the cause
        return f"cannot be read ({type(e).__name__}: {e})"
    return None


def check_inputs(files: Sequence[dict], root: str | None, select: str = "") -> None:
    """Every input readable and every output name its own, before any map is computed; all problems at once.
    `select`: how the user can narrow the inputs instead (folder inference's pattern), named in the message."""
    problems = [f"{entry[key]}: {why}" for entry in files for key in ("image", "label")
                if key in entry and (why := unreadable(str(entry[key])))]  # fmt: skip
    advice = ["remove or replace the files that cannot be read"] if problems else []
    names: dict[str, str] = {}
    outside, clashes = False, False
    for entry in files:
        name = output_name(str(entry["image"]), root)
        if name == os.pardir or name.startswith(os.pardir + os.sep):
            problems.append(f"{entry['image']}: not below {root}, so MONAI's writers would put its maps outside the "
                            "output folder")  # fmt: skip
            outside = True
        elif name in names:
            problems.append(f"{entry['image']}: its maps would overwrite those of {names[name]} (both <{name}>_*)")
            clashes = True
        names.setdefault(name, str(entry["image"]))
    if outside:
        common = os.path.commonpath([os.path.dirname(os.path.abspath(str(e["image"]))) for e in files])
        advice.append(f"set --input_root to a folder that holds every input (--input_root {common})")
    if clashes:
        advice.append("rename one of each pair with the same name")
    if problems:
        advice += [f"or narrow the inputs with {select}"] if select else []
        raise DataError(
            f"{len(problems)} of {len(files)} inputs cannot be processed; nothing was written:{listing(problems)}"
            f"\nTo go on: {'; '.join(advice)}; then run again."
        )


def done(files: Sequence[dict], maps_dir: str, outputs: Sequence[str]) -> None:
    """The last line of an inference: how many inputs, and where their outputs are (ignite's own last line is not)."""
    if distributed.is_main():
        where = (
            f"their {', '.join(outputs)} files are in {maps_dir}" if outputs else "nothing saved (--save_maps False)"
        )
        logger.info(f"inference done: {len(files)} input(s); {where}")


def unfinished(
    files: Sequence[dict],
    maps_dir: str,
    root: str | None,
    record: dict,
    outputs: Sequence[str],
    resume: bool = True,
    check: Callable[[list[dict]], list[dict]] | None = None,
    results: Sequence[str] = (),
) -> list[dict]:
    """The inputs still to map. A rerun of the same inference (the same checkpoint file, settings and input files,
    recorded in ``<maps_dir>/inference.json``) skips every input whose last output (`outputs`, in the order they are
    written) is complete, so a killed run over a large folder resumes where it stopped. Any other run maps every
    input, and first moves the maps and record of the earlier run, with the files of `results` (globs: evaluation's
    metrics), to ``<maps_dir>.replaced-<time>``: they are never written over, and a rerun after a kill never takes
    another run's maps for its own. Metrics found without a record (an older version's) go aside too (maps without
    one stay: they may be a user's own files), and an evaluation without maps keeps a record for its metrics.

    Every rank decides from the folder as it was before rank 0 records this run (a barrier in between), so the ranks
    of a torchrun agree on the list they shard. ``check`` (the input check) runs on that list before anything is
    recorded or removed: inputs that stop the run leave the folder as it was.
    """
    path = os.path.join(maps_dir, "inference.json")
    record = json.loads(json.dumps({**record, "inputs": file_table(files)}, default=str))
    last = [os.path.join(maps_dir, output_name(e["image"], root) + outputs[-1]) for e in files] if outputs else []
    recorded = bool(outputs or results)  # an evaluation without maps still has metrics to keep
    previous = None
    if recorded and os.path.isfile(path):
        try:
            with open(path) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = {}  # unreadable: another run's, as far as anyone can tell
        previous = previous if isinstance(previous, dict) else {}
    same = resume and bool(outputs) and previous == record  # without maps there is nothing to skip
    todo = [e for e, marker in zip(files, last) if not complete(marker)] if same else list(files)
    if len(todo) < len(files):
        logger.info(f"{maps_dir}: {len(files) - len(todo)} of {len(files)} inputs already mapped by this inference; "
                    f"mapping the other {len(todo)} (--resume_maps False maps them all)")  # fmt: skip
    if check is not None:
        todo = check(todo)
    distributed.barrier()
    if recorded and distributed.is_main():
        try:
            os.makedirs(maps_dir, exist_ok=True)
        except OSError as e:
            raise OSError(f"{maps_dir}: the maps cannot be written there ({e}); use a writable --output_dir") from None
        metrics = [f for p in results for f in glob.glob(p)]
        if previous is None:  # no record: maps of unknown origin stay (they may be a user's files); metrics go aside
            _move_aside(maps_dir, [], metrics, "held metrics without a record of what made them (an older version's?)")
        elif previous != record:
            kinds = [*outputs, *(previous.get("outputs") or [])]  # the earlier run's overlays, where this one has none
            _move_aside(maps_dir, [path, *_maps_in(maps_dir, kinds)], metrics)
        write_json(path, record)
    distributed.barrier()  # no rank writes a map before rank 0 has moved the earlier ones
    return todo


def _maps_in(maps_dir: str, outputs: Sequence[str]) -> list[str]:
    """The map files under `maps_dir` (names ending as `outputs` do; inputs' subfolders kept)."""
    return [
        os.path.join(d, n) for d, _, names in os.walk(maps_dir) for n in sorted(names) if n.endswith(tuple(outputs))
    ]


def _move_aside(maps_dir: str, maps: Sequence[str], results: Sequence[str], why: str = "") -> None:
    """Another inference's maps and record, and evaluation's metrics (`results`), to ``<maps_dir>.replaced-<time>``
    with their relative paths, and a warning; nothing else in the folders moves."""
    moved = [f for f in dict.fromkeys([*maps, *results]) if os.path.isfile(f)]
    held = [f for f in moved if os.path.basename(f) != "inference.json"]
    if not held:
        return  # a record alone (a run killed before its first map): nothing finished to keep
    aside = stamped = f"{maps_dir.rstrip(os.sep)}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in itertools.count(2):  # two runs replaced within one second keep a folder each
        if not os.path.exists(aside):
            break
        aside = f"{stamped}-{n}"
    try:
        for f in moved:
            base = maps_dir if f.startswith(maps_dir.rstrip(os.sep) + os.sep) else os.path.dirname(f)
            target = os.path.join(aside, os.path.relpath(f, base))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(f, target)
    except OSError as e:
        raise OSError(f"{maps_dir}: the maps of another inference there cannot be moved aside to {aside} ({e}); "
                      "use another --output_dir") from None  # fmt: skip
    what = "maps and metrics" if results and len(held) > len(results) else "metrics" if results else "maps"
    why = why or f"held the {what} of another inference (another checkpoint, settings or inputs)"
    logger.warning(f"{maps_dir}: {why}; moved to {aside}")


def complete(path: str) -> bool:
    """Whether an output file was written to its end (a killed run can leave the file it was writing cut short)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    try:
        if path.endswith(".png"):
            from PIL import Image

            with Image.open(path) as image:
                image.load()
        else:
            import nibabel as nib

            np.asarray(nib.load(path).dataobj)
    except Exception:  # noqa: BLE001 - any reader error means the file is not usable
        return False
    return True


def output_name(path: str, root: str | None) -> str:
    """The name MONAI's writers give an input's outputs (before the postfix), e.g. "bottle/test/good/000"."""
    return create_file_basename("", os.path.abspath(str(path)), "", root or "", separate_folder=False, makedirs=False)


def item_filename(item: dict) -> str:
    """The input file an engine output item came from (its metadata), for output names."""
    for key in ("pred", "image"):
        meta = getattr(item.get(key), "meta", None) or {}
        if "filename_or_obj" in meta:
            return str(meta["filename_or_obj"])
    return "image"


class AnomalyInferer(Inferer):
    """Calls the detector on a plain tensor and gives the map the input's metadata back.

    The detector runs thousands of small tensor operations per image (healing, KDE); MetaTensor's bookkeeping on each
    would cost time and carries nothing the detector uses. The map returned has the input's metadata (file name,
    affine, applied transforms), which ``SaveImaged`` and ``Invertd`` need.
    """

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        score = network(plain, *args, **kwargs)
        if not isinstance(inputs, MetaTensor):
            return score
        out = MetaTensor(score, meta=inputs.meta, applied_operations=inputs.applied_operations)
        out.is_batch = inputs.is_batch
        return out


class ShiftScored(MapTransform):
    """Adds `by` to a map. Around `Invertd`, which fills with 0 what the network did not see (a crop's margin, the
    air CropForegroundd removes), the detector's score is shifted so that 0 is its most normal value
    (``AnomalyDetector.lowest_score``), and shifted back after: the margin then reads as normal, not as a score of 0.
    Not MONAI's `ShiftIntensityd`: it reads an optional factor from `<key>_meta_dict`, which the served data (as
    tests/test_monai_label.py builds it) holds as None."""

    def __init__(self, keys: KeysCollection, by: float) -> None:
        super().__init__(keys)
        self.by = float(by)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key] + self.by  # a MetaTensor keeps its metadata and applied operations
        return d


class AnomalyOutputd(MapTransform):
    """The score map on the input's grid becomes `score_map`, its label map `segmentation` (uint8, 1 = anomaly), and
    `pred` one of them: MONAI Label and viewers write `pred` with the input's format (a PNG cannot hold floats) and
    read its values as labels. The request key `anomaly_output` ("segmentation" or "score") chooses; `result`
    (MONAI Label's JSON answer) gets the image score and the anomalous fraction. A map without a density threshold
    (a baseline's: `density_threshold` None) has no segmentation: `pred` is the score and the answer its image score.
    """

    OUTPUTS = ("segmentation", "score")

    def __init__(self, keys: KeysCollection, density_threshold: float | None, default: str = "segmentation") -> None:
        super().__init__(keys)
        if default not in self.OUTPUTS:
            raise ValueError(f"anomaly_output must be one of {self.OUTPUTS}, got {default!r}")
        self.density_threshold, self.default = density_threshold, default

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        choice = d.get("anomaly_output") or self.default
        if choice not in self.OUTPUTS:
            raise ValueError(f"anomaly_output must be one of {self.OUTPUTS}, got {choice!r}")
        for key in self.key_iterator(d):
            score = d[key].float()
            if isinstance(score, MetaTensor):  # a map has no channel, even where its RGB input had one last
                score.meta = {**score.meta, "original_channel_dim": "no_channel"}
            d["score_map"], d["result"] = score, {**(d.get("result") or {}), "image_score": float(score.max())}
            if self.density_threshold is None:  # a baseline's map has no threshold of its own: the score is all
                d[key] = score
                continue
            seg = segment(score, self.density_threshold).to(torch.uint8)
            d["segmentation"] = seg
            d[key] = seg if choice == "segmentation" else score
            d["result"].update(anomalous_fraction=float(seg.float().mean()), density_threshold=self.density_threshold)
        return d
