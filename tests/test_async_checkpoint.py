"""Background checkpoints (``checkpoint.async_save``, megatron-core's persistent checkpoint worker): a run stopped
and resumed from them under two ranks reproduces an uninterrupted run, and a kill while a write is in flight leaves
the previous ``latest`` loadable, the run resumed from it being the uninterrupted one exactly (one rank)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from mimo.train.checkpoint.manager import PARTIAL_SUFFIX

from layout_runs import Run, run_group, run_single

pytestmark = pytest.mark.system

ASYNC = ("checkpoint.async_save=true", "checkpoint.interval=2")
RESUME_TOLERANCE = 1e-6


def losses(run: Run) -> list[float]:
    return [record["loss"] for record in run.metrics()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache):
    return run_single(Run(tmp_path_factory.mktemp("sync"), ["train.steps=6", "checkpoint.interval=100"]), data_cache)


def test_two_ranks_resume_from_background_checkpoints(tmp_path, data_cache, uninterrupted):
    runs = [
        Run(tmp_path, ["train.steps=6", *ASYNC, "train.stop_after_steps=3", "parallel.ep=2"]),
        Run(tmp_path, ["train.steps=6", *ASYNC]),
    ]
    run_group(2, runs, data_cache)
    assert any("resumed from" in line and "step_0000003" in line for line in runs[1].log), "the stop waited"
    assert losses(runs[1]) == pytest.approx(losses(uninterrupted), rel=1e-5), "layouts agree to 1e-5"
    # checkpoint.keep=2 applies to background writes: step 2 went; step 6 ends the stage and is kept besides.
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == [
        "latest",
        "step_0000003",
        "step_0000004",
        "step_0000006",
    ]


def test_a_kill_during_a_background_write_leaves_the_previous_checkpoint(tmp_path, data_cache, uninterrupted):
    """With a save after every step, a write is in flight nearly all the time; the job is killed (with its
    worker) while one is, and a new run resumes from ``latest`` as if nothing had happened."""
    argv = Run(tmp_path, ["train.steps=6", "checkpoint.async_save=true", "checkpoint.interval=1"]).argv(data_cache)
    job = subprocess.Popen(
        [sys.executable, "-m", "mimo.train", *argv],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoints = tmp_path / "checkpoints"
    deadline = time.monotonic() + 300
    try:
        while not ((checkpoints / "latest").exists() and list(checkpoints.glob(f"*{PARTIAL_SUFFIX}"))):
            assert job.poll() is None and time.monotonic() < deadline, "no background write in flight was seen"
            time.sleep(0.005)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the trainer and its checkpoint worker
        job.wait()
    latest = (checkpoints / "latest").read_text()
    step = int(latest.split("_")[1])
    resumed = run_single(Run(tmp_path, ["train.steps=6", "checkpoint.interval=100"]), data_cache)
    assert any(f"resumed from {checkpoints / latest}" in line for line in resumed.log)
    tail = losses(resumed)[len(losses(resumed)) - (6 - step) :]
    assert tail == pytest.approx(losses(uninterrupted)[step:], rel=RESUME_TOLERANCE, abs=0)
