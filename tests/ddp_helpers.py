"""Handlers the torchrun tests load into the bundle's subprocesses (tests/ is on their PYTHONPATH)."""

import os

from ignite.engine import Events

from scripts import distributed


class KillRank:
    """Kills this process, as `kill -9` would (no cleanup), when a Transformer's epoch `epoch` starts on rank `rank`,
    and only while the environment variable ILTM_TEST_KILL is set (the rerun that must resume has it unset)."""

    def __init__(self, rank: int = 1, epoch: int = 2) -> None:
        self.rank, self.epoch = rank, epoch

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED(once=self.epoch), self)

    def __call__(self, engine) -> None:
        if os.environ.get("ILTM_TEST_KILL"):
            distributed.barrier()  # rank 0 has written the previous epoch's checkpoint before this epoch starts
            if distributed.rank() == self.rank:
                os._exit(9)
