"""Where a training process stands in a torchrun job, and how it hears that it must stop.

:class:`Dist` is the process's rank in the job (rank 0 of 1 without torchrun). :class:`StopSignals` turns SIGUSR1
or SIGTERM (SLURM's warning before the time limit) into a request to stop after the current step, agreed by every
rank at the same step; :func:`train.loop.fit` then writes its checkpoint and returns with ``preempted`` set.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.signals import signal_handlers

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str, timeout: float = 600.0) -> Dist:
        """Join the torchrun job described by the environment (``WORLD_SIZE``, ``RANK``, ...). timeout: seconds a
        collective waits for the other ranks before it raises (``RunOptions.dist_timeout``)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout))
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a single process)."""
        if self.world_size > 1:
            dist.barrier()


class StopSignals:
    """SIGUSR1 / SIGTERM as a request to stop after the current step (SLURM's ``--signal=B:USR1@120`` warning).

    A context manager: on entry it installs its handler for ``signals``, in the main thread only (elsewhere
    nothing is installed and it never fires); on exit it restores the previous handlers. ``received`` is the name
    of the first signal this process got; ``stopped`` becomes True when :meth:`should_stop` agreed to stop.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPT_SIGNALS) -> None:
        self.signals = signals
        self.received: str | None = None
        self.stopped = False
        self._installed = contextlib.ExitStack()

    def __enter__(self) -> StopSignals:
        self._installed.enter_context(signal_handlers({s: self._handle for s in self.signals}))
        return self

    def __exit__(self, *exc) -> None:
        self._installed.close()

    def _handle(self, signum: int, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def should_stop(self, world: Dist, device: torch.device) -> bool:
        """True on every rank once any rank got a signal: under torchrun an all-reduce (max) of the flag, so call it
        at the same step on every rank."""
        flag = self.received is not None
        if world.world_size > 1:
            t = torch.tensor([float(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        self.stopped = self.stopped or flag
        return flag
