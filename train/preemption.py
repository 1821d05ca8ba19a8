"""Turns SIGTERM/SIGINT (Slurm preemption, Ctrl-C, torchrun shutting down) into a checkpoint and a clean exit.

The handler only records the signal; the loop asks after each step, and all ranks agree through one all-reduce
so that every rank saves the same step and leaves together.
"""

import logging
import signal
from types import FrameType

import torch
import torch.distributed as dist

logger = logging.getLogger("mimo")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self._signal: int | None = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self._signal is None:
            logger.warning(
                "received %s: saving a checkpoint after this step, then stopping", signal.Signals(signum).name
            )
        self._signal = signum

    def agreed(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank was signalled."""
        flag = torch.tensor([0 if self._signal is None else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
