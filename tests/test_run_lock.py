"""One job per run directory: a live holder is refused with its name, a dead one (killed, lost node, an earlier run
of the same Slurm job) is taken over, and a real second mimo-train is refused while a run after kill -9 of the
first takes over and resumes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import pytest

from mimo.train.fault import RunDirBusy
from mimo.train.fault.run_lock import LOCK_FILE, Holder, RunLock

STALE_MINUTES = 10.0
JOB_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID")


@pytest.fixture(autouse=True)
def no_job_ids(monkeypatch):
    """The lock reads the job's identity from the environment; tests set it themselves."""
    for name in JOB_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def sleeper():
    """A live process other than this one."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


def write_lock(run_dir, host: str, pid: int, job: str | None = None, age_seconds: float = 0.0) -> None:
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps(asdict(Holder(host, pid, "2026-01-01T00:00:00", job))))
    stamp = time.time() - age_seconds
    os.utime(path, (stamp, stamp))


def holder_of(run_dir) -> dict:
    return json.loads((run_dir / LOCK_FILE).read_text())


def test_acquire_writes_this_process_and_release_removes_it(tmp_path):
    lock = RunLock(tmp_path, STALE_MINUTES)
    lock.acquire()
    assert holder_of(tmp_path)["pid"] == os.getpid() and holder_of(tmp_path)["host"] == socket.gethostname()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_holder_on_this_host_is_refused_by_name(tmp_path, sleeper):
    write_lock(tmp_path, socket.gethostname(), sleeper.pid)
    with pytest.raises(RunDirBusy, match=rf"in use by another job \(host {socket.gethostname()}, pid {sleeper.pid}"):
        RunLock(tmp_path, STALE_MINUTES).acquire()
    assert holder_of(tmp_path)["pid"] == sleeper.pid
    write_lock(tmp_path, socket.gethostname(), sleeper.pid, age_seconds=(STALE_MINUTES + 1) * 60)
    lock = RunLock(tmp_path, STALE_MINUTES)  # a running pid that stopped refreshing: reused by another process
    lock.acquire()
    assert holder_of(tmp_path)["pid"] == os.getpid()
    lock.release()


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path, sleeper):
    sleeper.kill()
    sleeper.wait()
    write_lock(tmp_path, socket.gethostname(), sleeper.pid)
    lock = RunLock(tmp_path, STALE_MINUTES)
    lock.acquire()
    assert holder_of(tmp_path)["pid"] == os.getpid()
    lock.release()


@pytest.mark.parametrize("age_minutes, taken", [(1.0, False), (STALE_MINUTES + 1, True)])
def test_another_hosts_lock_is_taken_over_only_once_stale(tmp_path, age_minutes, taken):
    write_lock(tmp_path, "node-that-vanished", 4242, age_seconds=age_minutes * 60)
    lock = RunLock(tmp_path, STALE_MINUTES)
    if not taken:
        with pytest.raises(RunDirBusy, match=r"host node-that-vanished, pid 4242.*refreshed \d+ s ago"):
            lock.acquire()
        return
    lock.acquire()
    assert holder_of(tmp_path)["pid"] == os.getpid()
    lock.release()


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "8812")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    write_lock(tmp_path, "first-node-of-the-job", 4242, job="8812.0")
    lock = RunLock(tmp_path, STALE_MINUTES)
    lock.acquire()
    assert holder_of(tmp_path)["job"] == "8812.0" and holder_of(tmp_path)["pid"] == os.getpid()
    lock.release()
    monkeypatch.setenv("SLURM_JOB_ID", "9000")
    write_lock(tmp_path, "first-node-of-the-job", 4242, job="8812.0")
    with pytest.raises(RunDirBusy, match="job 8812.0"):
        RunLock(tmp_path, STALE_MINUTES).acquire()


def test_an_fcntl_lock_proves_the_holder_alive_whatever_its_age(tmp_path):
    write_lock(tmp_path, "other-node", 4242, age_seconds=(STALE_MINUTES + 5) * 60)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(tmp_path / LOCK_FILE)!r}, os.O_RDWR)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match="other-node"):
            RunLock(tmp_path, STALE_MINUTES).acquire()
    finally:
        holder.kill()
        holder.wait()


def _launch(run_dir, data_cache, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mimo.train", f"run.dir={run_dir}", f"data.cache_dir={data_cache}", *overrides]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )


@pytest.mark.system
def test_second_job_is_refused_and_a_job_after_kill_9_takes_over_and_resumes(tmp_path, data_cache):
    common = ("train.steps=500", "logging.interval=1", "checkpoint.interval=2")
    first = _launch(tmp_path, data_cache, *common)
    deadline = time.monotonic() + 300
    while not (tmp_path / "checkpoints" / "latest").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first job did not save a checkpoint"
        time.sleep(0.2)

    second = _launch(tmp_path, data_cache, *common)
    output, _ = second.communicate(timeout=120)
    assert second.returncode == 2, output
    assert f"mimo-train: error: {tmp_path} is in use by another job (host {socket.gethostname()}, pid {first.pid}" in (
        output
    )
    assert "Traceback" not in output

    os.killpg(first.pid, signal.SIGKILL)  # the job and its children, as a lost node or an OOM kill would
    first.wait()
    saved = (tmp_path / "checkpoints" / "latest").read_text()
    third = _launch(tmp_path, data_cache, *common, f"train.stop_after_steps={int(saved.split('_')[1]) + 1}")
    output, _ = third.communicate(timeout=300)
    assert third.returncode == 0, output
    assert "took over the lock" in output and f"resumed from {tmp_path / 'checkpoints' / saved}" in output
    assert not (tmp_path / LOCK_FILE).exists(), "a finished job releases the run directory"
