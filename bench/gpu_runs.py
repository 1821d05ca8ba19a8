"""Training runs for bench/gpu_check.py: one ``mimo-train`` process each, killed at its deadline, never fatal.

A run that fails or overruns is recorded with the end of its output and the check goes on with the next stage:
on a lent GPU every minute counts, and the first run of mimo on CUDA is expected to find problems.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mimo.train.checkpoint.manager import LATEST_FILE, step_dir_name

OUTPUT_TAIL_CHARS = 3000
"""How much of a failed run's output the summary keeps."""
KILL_GRACE_S = 5


class StageFailed(RuntimeError):
    pass


@dataclass
class RunResult:
    records: list[dict]
    seconds: float
    failure: str | None = field(repr=False, default=None)
    """Set when the process failed after logging steps (a full disk at the final checkpoint, say): the
    measurements stand, the failure is reported beside them."""

    def lm_losses(self) -> list[float]:
        return [record["lm_loss"] for record in self.records]

    def tokens_per_s(self) -> float:
        """Median over the logged steps after the first (which includes warm-up: allocation, kernel choice)."""
        measured = self.records[1:] or self.records
        return statistics.median(record["tokens_per_s"] for record in measured)


def scratch_root() -> str:
    """Where runs write: the candidate with the most free space, /dev/shm (memory, fast) or the temp folder.
    Every run saves a checkpoint at its end, and the proxy's is about 47 GB (BF16 weights, FP32 main weights and
    Adam moments)."""
    candidates = [path for path in ("/dev/shm", tempfile.gettempdir()) if Path(path).is_dir()]
    return max(candidates, key=lambda path: shutil.disk_usage(path).free)


class Runner:
    """Starts runs below one scratch directory and deletes each run's files afterwards."""

    def __init__(self, scratch: Path, data_cache: Path, deadline: float) -> None:
        self.scratch = scratch
        self.data_cache = data_cache
        self.deadline = deadline

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def train(
        self, name: str, overrides: Sequence[str], timeout_s: float, env: dict[str, str] | None = None
    ) -> RunResult:
        run_dir = self.scratch / name
        try:
            return self.train_in(run_dir, overrides, timeout_s, env)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)

    def train_in(
        self, run_dir: Path, overrides: Sequence[str], timeout_s: float, env: dict[str, str] | None = None
    ) -> RunResult:
        """Run in ``run_dir`` (kept: the caller may resume from it) within ``timeout_s`` and the check's deadline."""
        limit = min(timeout_s, self.remaining())
        if limit <= 0:
            raise StageFailed("skipped: the check's time budget is spent")
        metrics = run_dir / "metrics.jsonl"
        seen = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        command = [
            sys.executable,
            "-m",
            "mimo.train",
            f"run.dir={run_dir}",
            f"data.cache_dir={self.data_cache}",
            "logging.interval=1",
            *overrides,
        ]
        start = time.monotonic()
        with tempfile.TemporaryFile("w+") as output:
            process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
            try:
                code = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                process.kill()  # one process: its GPU memory goes with it
                process.wait(timeout=KILL_GRACE_S)
                code = None
            output.seek(0)
            tail = output.read()[-OUTPUT_TAIL_CHARS:]
        seconds = time.monotonic() - start
        records = [json.loads(line) for line in metrics.read_text().splitlines()[seen:]] if metrics.exists() else []
        failure = None
        if code != 0:
            reason = f"killed after {limit:.0f} s" if code is None else f"exit {code}"
            failure = f"{' '.join(command)}: {reason}\n{tail}"
            if not records:
                raise StageFailed(failure)
        return RunResult(records=records, seconds=seconds, failure=failure)


def copy_checkpoint(source_run: Path, step: int, target_run: Path) -> None:
    """Make ``target_run`` resume from ``source_run``'s checkpoint of ``step``."""
    target = target_run / "checkpoints"
    target.mkdir(parents=True)
    name = step_dir_name(step)
    shutil.copytree(source_run / "checkpoints" / name, target / name)
    (target / LATEST_FILE).write_text(name)


def relative_gaps(values: Sequence[float], reference: Sequence[float]) -> list[float]:
    return [(value - ref) / ref for value, ref in zip(values, reference)]
