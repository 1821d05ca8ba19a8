"""The hang watchdog: a step that runs far too long (a hung collective, a dead peer, a stuck filesystem) makes every
rank write its Python stacks to ``<run.dir>/hang/`` and end the job with a non-zero status, so that the launcher's
requeue resumes from the last checkpoint instead of the job idling until its time limit.

It is ``faulthandler``'s watchdog: a C thread that dumps every thread's stack and exits the process without
needing the interpreter lock, so it fires even when the main thread is blocked inside a collective or a C call.
Each rank arms it at the start of every step, which replaces the previous deadline: ``fault.step_timeout_minutes``,
or, once a few steps were timed, ``fault.step_timeout_median_factor`` times the median step if that is shorter.
A checkpoint save or a rollback's load is held to the fixed limit only. Every rank's own watchdog fires, so the
stacks of the rank that hung and of those waiting for it are all written.

Each rank's report ``hang/rank_NNNNN-pidPID.txt`` starts with a header (rewritten in place at each arming, one
small write) naming the step and the limit; the stacks follow only if the limit passed. A run that ends normally
removes its reports.
"""

import faulthandler
import logging
import os
import socket
import statistics
import time
from collections import deque
from pathlib import Path

from mimo.train.config import FaultConfig

logger = logging.getLogger("mimo")

HANG_SUBDIR = "hang"
TIMED_STEPS_BEFORE_MEDIAN = 5
"""Steps timed before the median-based limit applies (the first steps include warm-up)."""
MEDIAN_WINDOW = 100
"""Recent step durations the median is taken over."""
HEADER_BYTES = 512
"""The header is padded to this size so that rewriting it never moves the stacks written after it."""
SECONDS_PER_MINUTE = 60


class HangWatchdog:
    def __init__(self, cfg: FaultConfig, run_dir: str | Path, rank: int, world_size: int) -> None:
        self.fixed_seconds = cfg.step_timeout_minutes * SECONDS_PER_MINUTE if cfg.step_timeout_minutes else None
        self.median_factor = cfg.step_timeout_median_factor
        self.rank, self.world_size = rank, world_size
        self.path = Path(run_dir) / HANG_SUBDIR / f"rank_{rank:05d}-pid{os.getpid()}.txt"
        self._durations: deque[float] = deque(maxlen=MEDIAN_WINDOW)
        self._file = None
        self._step_started: float | None = None

    @property
    def enabled(self) -> bool:
        return self.fixed_seconds is not None or self.median_factor is not None

    def _step_limit(self) -> float | None:
        limits = [self.fixed_seconds] if self.fixed_seconds is not None else []
        if self.median_factor is not None and len(self._durations) >= TIMED_STEPS_BEFORE_MEDIAN:
            limits.append(self.median_factor * statistics.median(self._durations))
        return min(limits) if limits else None

    def arm_step(self, step: int) -> None:
        """At the start of each step: the previous step (if it saved nothing) is timed, a new deadline set."""
        now = time.monotonic()
        if self._step_started is not None:
            self._durations.append(now - self._step_started)
        self._step_started = now
        self._arm(step, "step", self._step_limit())

    def arm_checkpoint(self, step: int, what: str) -> None:
        """Before a checkpoint is saved or loaded (a rollback): the fixed limit only, and the iteration is not
        timed (it is no measure of a step)."""
        self._step_started = None
        self._arm(step, what, self.fixed_seconds)

    def _arm(self, step: int, what: str, seconds: float | None) -> None:
        if seconds is None:
            faulthandler.cancel_dump_traceback_later()
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w+b")
            self._file.seek(HEADER_BYTES)
        header = (
            f"mimo hang watchdog: rank {self.rank} of {self.world_size}, host {socket.gethostname()}, pid"
            f" {os.getpid()}: {what} at step {step} was given {seconds:.0f} s from"
            f" {time.strftime('%Y-%m-%d %H:%M:%S')}. The Python stacks of every thread follow if it took longer;"
            " the job then exited so that a requeue resumes from the last checkpoint."
        )
        os.pwrite(self._file.fileno(), header.encode()[: HEADER_BYTES - 1].ljust(HEADER_BYTES - 1) + b"\n", 0)
        faulthandler.dump_traceback_later(seconds, repeat=False, file=self._file, exit=True)

    def close(self) -> None:
        """Disarm and remove this process's report: the run ended without hanging."""
        faulthandler.cancel_dump_traceback_later()
        if self._file is not None:
            self._file.close()
            self._file = None
            self.path.unlink(missing_ok=True)
            try:
                self.path.parent.rmdir()
            except OSError:  # other ranks' reports, or earlier hangs', are still there
                pass
