"""One run per output folder: what a run started with is recorded, a rerun with other data or settings stops before
any work, and two processes never train into one folder at once.

``<output_dir>/run.json`` holds the settings that determine the results (the config's ``run_settings``), the
training and validation files with their sizes and modification times, and the bundle version. A rerun into the
folder compares them first: the same run resumes; another one stops with what differs and the three ways on (a new
``--output_dir``, ``--resume True`` to keep the completed steps as they are, ``--overwrite True`` to move the old
run aside); a run of another kind of detector stops with the two ways on that keep it. A folder without ``run.json``
that holds what a training writes (``model.pt``, ``vqvae/``, ...) is refused as well, so that nothing there is
written over. ``<output_dir>/run.lock`` names the process that trains into the folder; a lock left by a killed run
(its process is gone) is replaced with a warning.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from fnmatch import fnmatch
from typing import Any

from scripts import distributed
from scripts.checkpoint import current_keys, detector_kind, flatten
from scripts.files import write_json
from scripts.steps import read_record

logger = logging.getLogger(__name__)

# settings that only decide how far a run goes (or how fast): changing them does not make its completed steps wrong
EXTENDABLE = ("iltm#max_iterations", "iltm#min_iterations", "iltm#stop_tolerance", "iltm#mask_batch_size")
SHOWN = 8  # differing files listed by name
# what a training writes into its output folder (ILTM and the baselines): a folder holding one of these but no run
# record would have it written over
WRITES = ("model.pt", "state.json", "vqvae", "tokens", "iltm", "baseline", "stkd")


class RunConflict(RuntimeError):
    """A rerun whose data or settings differ from the run already in the output folder, or a concurrent run."""


def file_table(entries: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    """{path: [size, mtime]} of every image and label of `entries`: cheap, and changes when a file is rewritten."""
    table = {}
    for entry in entries:
        for key in ("image", "label"):
            path = entry.get(key)
            if isinstance(path, str) and os.path.isfile(path):
                info = os.stat(path)
                table[os.path.abspath(path)] = [info.st_size, int(info.st_mtime)]
    return table


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    lines = []
    settings_old, settings_new = old.get("settings", {}), new.get("settings", {})
    for key in sorted(set(settings_old) | set(settings_new)):
        if key.startswith(EXTENDABLE):
            continue
        before, now = settings_old.get(key, "<unset>"), settings_new.get(key, "<unset>")
        if before != now:
            lines.append(f"{key}: {before!r} in the run, {now!r} now")
    for section in ("training", "validation"):
        before, now = old.get(section, {}), new.get(section, {})
        added, removed = sorted(set(now) - set(before)), sorted(set(before) - set(now))
        changed = sorted(p for p in set(now) & set(before) if now[p] != before[p])
        for label, paths in (("not in", added), ("no longer given, but in", removed), ("changed since", changed)):
            if paths:
                names = ", ".join(paths[:SHOWN]) + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")
                lines.append(f"{section} files {label} the run ({len(paths)}): {names}")
    return lines


class RunGuard:
    """Checks, records and locks the output folder before a training does any work (`start`), unlocks it (`finish`).

    Args:
        output_dir: the run's folder.
        settings: what determines the results, keyed by config id (nested dicts of plain values).
        train_files, val_files: the entries both stages train and validate on.
        detector: the detector's record (:func:`scripts.checkpoint.detector_record`: networks and data settings).
        version: the bundle's version, recorded (a new version alone does not stop a rerun); None: metadata.json's.
        resume: continue even when the settings or data differ, keeping the completed steps as they are.
        overwrite: move an existing run aside (to ``<output_dir>.replaced-<time>``) and start afresh; nothing is deleted.
        single_process: the config of a training that runs in one process only (the baselines), refused under torchrun.
    """

    def __init__(
        self,
        output_dir: str,
        settings: Mapping[str, Any],
        train_files: Sequence[Mapping[str, Any]],
        val_files: Sequence[Mapping[str, Any]],
        detector: Mapping[str, Any] | None = None,
        version: str | None = None,
        resume: bool = False,
        overwrite: bool = False,
        single_process: str | None = None,
    ) -> None:
        for name, flag in (("resume", resume), ("overwrite", overwrite)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False (capitalised on the command line), got {flag!r}")
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other: choose one")
        self.output_dir, self.resume, self.overwrite = output_dir, resume, overwrite
        self.single_process = single_process
        self.record = {
            "settings": {**flatten(settings), **flatten(detector or {})},
            "training": file_table(train_files),
            "validation": file_table(val_files),
            "version": _bundle_version() if version is None else version,
        }
        self.path = os.path.join(output_dir, "run.json")
        self.lock = os.path.join(output_dir, "run.lock")
        self.started = self.moved = self.warned = False
        atexit.register(self.finish)  # an error or Ctrl-C releases the lock too (a kill -9 leaves it: see _acquire)

    def start(self) -> None:
        """Checks and records the run, and takes the lock: rank 0's work under torchrun, the others wait for it."""
        if self.started:  # `training` runs `train_vqvae` and `train_iltm`, each of which starts the guard
            return
        distributed.check_launch("configs/multi_gpu_train.yaml", self.single_process)
        distributed.main_first(self._start)
        self.started = True

    def _start(self) -> None:
        # once per command: `training` starts the guard for each stage, and the second must keep the first's work
        if self.overwrite and not self.moved and os.path.isdir(self.output_dir) and os.listdir(self.output_dir):
            self._acquire()  # nobody else may be writing into what is moved
            os.remove(self.lock)
            aside = f"{self.output_dir.rstrip(os.sep)}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(self.output_dir, aside)
            logger.warning(f"{self.output_dir}: the previous run was moved to {aside} (--overwrite True)")
        self.moved = True
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            self._acquire()
        except OSError as e:  # no permission, a read-only or a pseudo file system (/proc)
            raise RunConflict(f"{self.output_dir}: cannot write into the output folder ({e}); use a writable "
                              "--output_dir") from None  # fmt: skip
        self._compare()

    def finish(self) -> None:
        """Releases the lock (a crash leaves it behind; the next run sees that its process is gone)."""
        if os.path.isfile(self.lock) and self._holder().get("pid") == os.getpid():
            os.remove(self.lock)
        self.started = False

    def _compare(self) -> None:
        has_steps = os.path.isfile(os.path.join(self.output_dir, "state.json"))
        if os.path.isfile(self.path):
            old = read_record(self.path, f"what the run in {self.output_dir} was started with")
            if isinstance(old.get("settings"), dict):
                old["settings"] = current_keys(old["settings"])  # a run an older version started
            kinds = [_method(r.get("settings")) for r in (old, self.record)]
            if None not in kinds and kinds[0] != kinds[1]:  # no setting of the one says anything about the other
                self.finish()
                raise RunConflict(
                    f"{self.output_dir} holds a run of {kinds[0]}, and this training builds {kinds[1]}. Use a new "
                    "--output_dir, or --overwrite True to move that run aside (--resume True cannot mix the two)."
                )
            differ = _differences(old, self.record)
            if differ and not self.resume:
                self.finish()
                raise RunConflict(
                    f"{self.output_dir} holds a run started with other data or settings:\n  "
                    + "\n  ".join(differ)
                    + "\nUse a new --output_dir for a new run; --resume True to continue this one with its completed "
                    "steps as they are; or --overwrite True to move it aside and start afresh."
                )
            if differ:
                if not self.warned:  # `training` starts the guard once per stage
                    logger.warning(
                        f"{self.output_dir}: resuming despite {len(differ)} differences (--resume True); the completed "
                        "steps keep the run's:\n  " + "\n  ".join(differ)
                    )
                    # the record keeps what the completed steps were made with, and says what the later ones were
                    state = os.path.join(self.output_dir, "state.json")  # its steps in the order they completed
                    done = list(read_record(state, "which steps of this run are complete")) if has_steps else []
                    resumed = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "after_steps": done, "differences": differ}
                    write_json(self.path, {**old, "resumed": [*old.get("resumed", []), resumed]}, indent=1)
                self.warned = True
                return
        elif has_steps:
            logger.warning(f"{self.output_dir}: a run without {os.path.basename(self.path)}; recording this one's")
        else:
            self._check_foreign()
        write_json(self.path, self.record, indent=1)

    def _check_foreign(self) -> None:
        """A folder that holds files but no run: refused where the run would write over them, else named."""
        present = sorted(
            n for n in os.listdir(self.output_dir)
            if not n.startswith(".") and n != "run.lock" and _results(os.path.join(self.output_dir, n))
        )  # fmt: skip
        if not present:
            return
        clash = [n for n in present if n in WRITES]
        if clash:
            self.finish()
            raise RunConflict(
                f"{self.output_dir} holds {', '.join(clash)} but no run record ({os.path.basename(self.path)}), so "
                f"a training there would write over {'it' if len(clash) == 1 else 'them'}. Use a new --output_dir, or "
                "--overwrite True to move the folder aside and start afresh."
            )
        shown = ", ".join(present[:SHOWN]) + (f" and {len(present) - SHOWN} more" if len(present) > SHOWN else "")
        logger.warning(f"{self.output_dir}: holds files that are not a run's ({shown}); the run is written beside them")

    def _holder(self) -> dict:
        try:
            with open(self.lock) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def _acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        while not self._create_lock(me):
            holder = self._holder()
            if holder.get("pid") == os.getpid() and holder.get("host") == me["host"]:
                return  # this process already holds it (an earlier call in the same process)
            if holder.get("host") == me["host"] and _alive(holder.get("pid")):
                raise RunConflict(
                    f"{self.output_dir} is in use: process {holder['pid']} has trained into it since "
                    f"{holder.get('started', '?')} ({self.lock}). Wait for it, or use another --output_dir."
                ) from None
            logger.warning(f"{self.lock}: left by a run that is gone ({holder or 'unreadable'}); replacing it")
            with contextlib.suppress(FileNotFoundError):  # another process replaced it first
                os.remove(self.lock)

    def _create_lock(self, me: dict) -> bool:
        """The lock appears with its content or not at all (a hard link is atomic), so that no other process ever
        reads it empty and takes it for a dead run's. Where the file system has no hard links, an exclusive create."""
        tmp = f"{self.lock}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(me, f)
            os.link(tmp, self.lock)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (FAT, some network mounts)
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


def _method(settings: Any) -> str | None:
    """The detector a run's recorded settings build, told apart down to the baseline; None: no network recorded."""
    kind = detector_kind(settings) if isinstance(settings, dict) else None
    if kind is None:
        return None
    if any(key.startswith("classifier_def#") for key in settings):  # CutPaste and STKD share one network
        return f"the {'STKD' if any(k.startswith('stkd#') for k in settings) else 'CutPaste'} baseline's detector"
    return kind[0]


def _results(path: str) -> bool:
    """Whether `path` is or holds a file other than a TensorBoard event file or MONAI's copy of the run's config
    (`config_<time>.json`, with --tracking mlflow): the stages' handlers write those before the guard starts."""
    name = os.path.basename(path)
    if not os.path.isdir(path):
        return not (name.startswith("events.out.tfevents") or fnmatch(name, "config_*.json"))
    return any(_results(os.path.join(path, sub)) for sub in os.listdir(path))


def _bundle_version() -> str:
    try:
        with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "metadata.json")) as f:
            return str(json.load(f).get("version", ""))
    except (OSError, ValueError):
        return ""


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
