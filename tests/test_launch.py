"""The launch scripts start real 2-process jobs, stop them the way a terminal or Slurm does, and the next launch
continues from the checkpoint the stop left.

One run directory goes through three launches, each resuming from the checkpoint the previous one stopped at:

1. ``launch/torchrun.sh`` (2 processes), stopped by SIGTERM to its process group (Ctrl-C or ``kill`` of the
   job): torchrun passes SIGTERM on, every rank finishes its step and saves.
2. ``launch/slurm.sbatch`` under a simulated Slurm job (SLURM_* variables, ``srun`` and ``scontrol`` stubs on
   PATH; srun runs its one task, the torchrun agent of this "node", with 2 processes), stopped as Slurm stops a
   preempted or cancelled job: SIGTERM to every process of the job (its process group here).
3. The requeued job (same command, SLURM_RESTART_COUNT=1), stopped as Slurm stops a job near its time limit:
   USR1 to the batch script only (``--signal=B:USR1@...``); the script asks the trainer to checkpoint, then
   requeues the job with ``scontrol requeue``.
"""

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[1]
NPROC = 2
JOB_ID = "4242"
TRAIN = (
    "train.steps=500",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.seq_length=64",
    "logging.interval=1",
    "checkpoint.interval=1000",
)
STEPS_BEFORE_STOP = 2
"""Steps a launch trains (beyond where it started) before it is stopped: enough to see that the steps continue."""
TIMEOUT_S = 300

SRUN_STUB = """#!/bin/bash
# srun stand-in: one node, so one task: drop srun's options and run the task in place (a signal srun would
# forward to its task reaches the task directly).
while [ "${1#--}" != "$1" ]; do shift; done
exec "$@"
"""
SCONTROL_STUB = """#!/bin/bash
# scontrol stand-in: the job's one node is this machine; a requeue is recorded for the test.
case "$1" in
    show) echo 127.0.0.1 ;;
    requeue) echo "requeue $2" >> "$MIMO_TEST_REQUEUES" ;;
    *) echo "unexpected scontrol $*" >&2; exit 1 ;;
esac
"""


def _write_stub(directory: Path, name: str, text: str) -> None:
    path = directory / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()]


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text()


def _checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """In its own session, like a job: its process group holds the script, torchrun and the ranks."""
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _train_then_stop(job: subprocess.Popen, run_dir: Path, stop) -> str:
    """Waits until the job has trained STEPS_BEFORE_STOP steps past where it started, stops it, returns its
    output."""
    start = max(_steps(run_dir), default=0)
    deadline = time.monotonic() + TIMEOUT_S
    while max(_steps(run_dir), default=0) < start + STEPS_BEFORE_STOP:
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill()
            raise AssertionError(f"the job did not train:\n{job.communicate()[0]}")
        time.sleep(0.2)
    stop(job)
    try:
        output, _ = job.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        raise
    return output


def _check_stopped_with_checkpoint(run_dir: Path, output: str, resumed_from: int) -> int:
    """The job saved at the step it stopped at, after continuing from ``resumed_from`` (0: a fresh start)."""
    steps = _steps(run_dir)
    stopped = steps[-1]
    assert steps == list(range(1, stopped + 1)), "steps do not continue where the previous launch stopped"
    assert stopped >= resumed_from + STEPS_BEFORE_STOP
    assert f"stopped at step {stopped} (signal)" in output, output
    assert _latest(run_dir) == _checkpoint(run_dir, stopped).name
    if resumed_from:
        assert f"resumed from {_checkpoint(run_dir, resumed_from)} (step {resumed_from}," in output, output
    else:
        assert "starting from scratch" in output, output
    return stopped


def test_stop_and_resume_under_torchrun_and_slurm(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    overrides = ["config", f"run.dir={run_dir}", f"data.cache_dir={data_cache}", *TRAIN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    # 1. torchrun.sh; SIGTERM to the job's process group
    job = _start([str(REPO / "launch" / "torchrun.sh"), *overrides], {**env, "NPROC_PER_NODE": str(NPROC)})
    output = _train_then_stop(job, run_dir, lambda job: os.killpg(job.pid, signal.SIGTERM))
    assert "mimo-plan: config" in output and "fits:" in output, "the launch did not check the plan first"
    first = _check_stopped_with_checkpoint(run_dir, output, resumed_from=0)

    # 2. slurm.sbatch in a simulated one-node job; preemption: SIGTERM to every process of the job
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_stub(bin_dir, "srun", SRUN_STUB)
    _write_stub(bin_dir, "scontrol", SCONTROL_STUB)
    requeues = tmp_path / "requeues"
    slurm = {
        **env,
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "node001",
        "SLURM_SUBMIT_DIR": str(REPO),
        "MIMO_GPUS_PER_NODE": str(NPROC),
        # The job's one node hosts the c10d rendezvous; on port 0 its torchrun agent binds a free port itself and
        # keeps it (as torchrun --standalone does), so no port is picked here and released.
        "MASTER_PORT": "0",
        "MIMO_TEST_REQUEUES": str(requeues),
    }
    sbatch = ["bash", str(REPO / "launch" / "slurm.sbatch"), *overrides]
    job = _start(sbatch, slurm)
    output = _train_then_stop(job, run_dir, lambda job: os.killpg(job.pid, signal.SIGTERM))
    assert f"job {JOB_ID} (restart 0): 1 nodes x {NPROC} GPUs" in output, output
    assert "SIGTERM from Slurm" in output
    second = _check_stopped_with_checkpoint(run_dir, output, resumed_from=first)
    assert not requeues.exists(), "a preempted job is requeued by Slurm, not by the script"

    # 3. the requeued job; near the time limit Slurm sends USR1 to the batch script alone
    job = _start(sbatch, {**slurm, "SLURM_RESTART_COUNT": "1"})
    output = _train_then_stop(job, run_dir, lambda job: os.kill(job.pid, signal.SIGUSR1))
    assert job.returncode == 0, output
    assert "time limit near" in output
    _check_stopped_with_checkpoint(run_dir, output, resumed_from=second)
    assert requeues.read_text() == f"requeue {JOB_ID}\n"
