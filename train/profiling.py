"""Profiler traces of chosen steps: ``profile.steps=[first, last]`` on the ranks in ``profile.ranks``.

Each chosen rank writes ``<run.dir>/profile/rank<R>_steps<first>-<last>.trace.json`` (torch profiler, Chrome trace
format: open it in Perfetto or chrome://tracing), and with ``profile.memory_snapshot=true`` also
``rank<R>_steps<first>-<last>.memory.pickle`` (CUDA caching-allocator history: drag it into
https://pytorch.org/memory_viz). The profiler starts before the first step's forward and stops after the last
step's optimizer update; the steps are otherwise unchanged.
"""

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mimo.recipes.errors import ConfigError
from mimo.train.config import ProfileConfig

logger = logging.getLogger("mimo")

PROFILE_SUBDIR = "profile"
MEMORY_HISTORY_ENTRIES = 100_000
"""Allocation events the CUDA memory snapshot keeps (the newest)."""


class StepProfiler:
    """Wraps each step (``with profiler.step(n):``); traces the configured ones on this rank."""

    def __init__(self, cfg: ProfileConfig, run_dir: str, rank: int, device: torch.device) -> None:
        cfg.validate()
        if cfg.memory_snapshot and device.type != "cuda":
            raise ConfigError(
                "profile.memory_snapshot=true records the CUDA caching allocator, and this run is on CPU; set "
                "profile.memory_snapshot=false (the trace of profile.steps still records CPU memory)"
            )
        self.steps = tuple(cfg.steps) if cfg.steps and rank in cfg.ranks else None
        self.memory_snapshot = cfg.memory_snapshot
        self.device = device
        self.directory = Path(run_dir) / PROFILE_SUBDIR
        self.rank = rank
        self._profile: profile | None = None

    @contextlib.contextmanager
    def step(self, number: int) -> Iterator[None]:
        if self.steps is not None and number == self.steps[0]:
            self._start()
        yield
        if self._profile is not None and number == self.steps[1]:
            self._stop(number)

    def _start(self) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._profile = profile(activities=activities, record_shapes=True, profile_memory=True)
        self._profile.start()
        if self.memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)

    def close(self, last_step: int) -> None:
        """At the end of the run: a run that stopped inside the profiled steps (``train.stop_after_steps``, a
        signal, an error) still stops the profiler and writes the steps it recorded. A profiler left running would
        keep its callbacks registered into the next run in this process and crash the interpreter at exit."""
        if self._profile is not None:
            self._stop(last_step)

    def _stop(self, last_step: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = self.directory / f"rank{self.rank}_steps{self.steps[0]}-{last_step}"
        self._profile.stop()
        self._profile.export_chrome_trace(f"{stem}.trace.json")
        self._profile = None
        written = [f"{stem}.trace.json"]
        if self.memory_snapshot:
            torch.cuda.memory._dump_snapshot(f"{stem}.memory.pickle")
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(f"{stem}.memory.pickle")
        logger.info("profile of steps %d-%d on rank %d: %s", self.steps[0], last_step, self.rank, ", ".join(written))
