"""Several processes, one run: what `torchrun` needs from the bundle beyond MONAI's own DDP support.

`configs/multi_gpu_train.yaml` and `configs/multi_gpu_evaluate.yaml` start the process group (NCCL on GPUs, gloo on
CPU) and shard the data with MONAI's `DistributedSampler`. The rules kept here: every rank computes, only rank 0
writes what the run keeps (checkpoints, `state.json`, reports, exports), and a barrier follows each such write so that
no rank reads a file before it is complete. In a single process every function is a no-op or the identity.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ignite.distributed as idist
import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def initialise() -> torch.device:
    """Joins the process group `torchrun` describes (env:// rendezvous) and returns this rank's device."""
    die_with_launcher()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    # ignite sets up its view of the group lazily with a collective call: on every rank now, not first on rank 0
    # inside a handler only rank 0 builds (which would wait for the others forever)
    idist.sync()
    if not is_main():  # the log is rank 0's (ignite's engines log each epoch on every rank); warnings still show
        logging.disable(logging.INFO)
    return device()


def die_with_launcher() -> None:
    """torchrun starts each rank in a session of its own, so a SIGKILLed torchrun (`timeout -s KILL`, the OOM killer)
    used to leave its ranks training on into the run's folder, or waiting forever for a peer. On Linux each rank now
    dies with the torchrun that started it, as the docs' "after a kill, the same command resumes" assumes."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        return  # not granted: the rank lives on as before
    if os.getppid() != parent:  # torchrun died between the two calls: this rank is an orphan already
        raise SystemExit("torchrun, which started this process, is gone; rerun the same command to resume")


def device() -> torch.device:
    return torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")


def finalise() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def check_launch(overlay: str, single_process: str | None = None) -> None:
    """Stops a torchrun whose processes would not form one run, before any work: without `overlay` (the config that
    joins them) each would train or map everything on its own into the same folder; `single_process` names a config
    that trains in one process only, where every rank would train the whole model again."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched <= 1 or "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun's (other launchers may set WORLD_SIZE)
        return
    if single_process:
        raise RuntimeError(
            f"{single_process} trains in one process, and torchrun started {launched}: each would train the whole "
            "model again. Run it with `python -m monai.bundle run ...`, without torchrun."
        )
    if not active():
        raise RuntimeError(
            f"torchrun started {launched} processes, but they did not join into one run: layer {overlay} last in "
            '--config_file (docs/README.md, "Several processes: torchrun").'
        )


def main_first(write: Callable[[], T]) -> T | None:
    """Runs `write` on rank 0 only (a file the run keeps), then lets every rank on; rank 0 gets its result."""
    result = write() if is_main() else None
    barrier()
    return result


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (a list of one in a single process)."""
    if not active():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_(tensors: Sequence[torch.Tensor]) -> None:
    """Rank 0's values in place on every rank: state a rank changed on its own (e.g. random codebook restarts)."""
    if active():
        for tensor in tensors:
            dist.broadcast(tensor, 0)


def wrap(network: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around `network` when several processes train it, else `network` itself."""
    if not active():
        return network
    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return nn.parallel.DistributedDataParallel(
        network, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (whose state_dict keys have no `module.` prefix)."""
    return network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
