"""The hang watchdog: its limit (fixed, then the median rule), and a two-rank torchrun job whose rank 1 hangs at
step 3 (``hang@3:1`` of the ``MIMO_FAULT_INJECTION`` testing hook) writing both ranks' stacks and exiting non-zero
long before any collective timeout."""

import os
import subprocess
import sys
import time

import pytest

from mimo.train.config import FaultConfig
from mimo.train.fault.injection import ENV_VAR
from mimo.train.fault.watchdog import HANG_SUBDIR, TIMED_STEPS_BEFORE_MEDIAN, HangWatchdog

STEP_TIMEOUT_MINUTES = 0.1
"""6 s: a tiny-model step takes well under a second even on a loaded 2-core machine."""
COLLECTIVE_TIMEOUT_MINUTES = 5
"""parallel.timeout_minutes: far longer than the watchdog's limit, so only the watchdog can end the job in time."""


def test_limit_is_fixed_until_steps_were_timed_then_the_shorter_of_both(tmp_path):
    watchdog = HangWatchdog(FaultConfig(step_timeout_minutes=2, step_timeout_median_factor=10), tmp_path, 0, 1)
    assert watchdog._step_limit() == 120
    watchdog._durations.extend([1.0, 3.0, 2.0, 50.0, 2.5][:TIMED_STEPS_BEFORE_MEDIAN])
    assert watchdog._step_limit() == 10 * 2.5
    watchdog._durations.extend([30.0] * 10)
    assert watchdog._step_limit() == 120
    off = HangWatchdog(FaultConfig(step_timeout_minutes=None, step_timeout_median_factor=None), tmp_path, 0, 1)
    assert off._step_limit() is None


def test_a_run_that_ends_normally_leaves_no_report(tmp_path):
    watchdog = HangWatchdog(FaultConfig(step_timeout_minutes=5), tmp_path, 3, 4)
    watchdog.arm_step(1)
    assert "step 1" in watchdog.path.read_text()
    watchdog.close()
    assert not (tmp_path / HANG_SUBDIR).exists()


@pytest.mark.system
def test_a_hung_rank_makes_every_rank_dump_its_stacks_and_the_job_exit(tmp_path, data_cache):
    env = {**os.environ, ENV_VAR: "hang@3:1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"),
        *("-m", "mimo.train", f"run.dir={tmp_path}", f"data.cache_dir={data_cache}", "train.steps=50"),
        *(
            f"fault.step_timeout_minutes={STEP_TIMEOUT_MINUTES}",
            f"parallel.timeout_minutes={COLLECTIVE_TIMEOUT_MINUTES}",
        ),
        "logging.interval=1",
    ]
    started = time.monotonic()
    job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=COLLECTIVE_TIMEOUT_MINUTES * 60)
    assert job.returncode != 0
    assert time.monotonic() - started < COLLECTIVE_TIMEOUT_MINUTES * 60 / 2
    reports = sorted((tmp_path / HANG_SUBDIR).glob("rank_*.txt"))
    assert [report.name.split("-")[0] for report in reports] == ["rank_00000", "rank_00001"], job.stderr[-3000:]
    for report in reports:
        text = report.read_text()
        assert f"step at step 3 was given {STEP_TIMEOUT_MINUTES * 60:.0f} s" in text
        assert "most recent call first" in text and "train/trainer.py" in text, text
    assert "in begin_step" in reports[1].read_text(), "rank 1's stack shows where it hung"
