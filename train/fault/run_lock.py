"""One job per run directory: ``<run.dir>/run.lock`` names the job writing there.

The main rank creates the file (exclusively) when its job starts and a background thread refreshes its time stamp
every few seconds while the job lives. A second job finds it and is refused at once, naming the holder (host, pid,
start time). A lock whose holder is gone is taken over:

* on the same host, when the holder's pid no longer runs (``kill -9``);
* anywhere, when its time stamp has not been refreshed for ``fault.lock_stale_minutes`` (a lost node, on a shared
  filesystem whose ``fcntl`` locks cannot be trusted across hosts);
* at once when it was written by an earlier incarnation of this same job (a Slurm requeue keeps its job and step
  ids; a torchrun restart keeps its rendezvous id), which is dead by the time its successor runs.

Where ``fcntl`` locks are honoured, the holder also keeps one on the file, and a lock that is held is never taken
over, whatever its time stamp says. A takeover renames the stale file away first: of two jobs taking over at once,
only one rename succeeds.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from mimo.train.fault import RunDirBusy

logger = logging.getLogger("mimo")

LOCK_FILE = "run.lock"
HEARTBEAT_SECONDS = 5.0
"""How often the holder refreshes the lock's time stamp (well below any sensible fault.lock_stale_minutes)."""
JOB_ID_VARIABLES = (("SLURM_JOB_ID", "SLURM_STEP_ID"), ("TORCHELASTIC_RUN_ID",))
"""Environment variables that identify a job across its restarts, tried in order."""
UNNAMED_RUN_IDS = ("", "none")
"""torchrun's rendezvous id when none was given: the same for every job, so it identifies none."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str
    job: str | None

    @classmethod
    def this_process(cls) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), datetime.now().isoformat(timespec="seconds"), current_job_id())

    def describe(self) -> str:
        job = f", job {self.job}" if self.job else ""
        return f"host {self.host}, pid {self.pid}{job}, started {self.started}"


def current_job_id() -> str | None:
    for names in JOB_ID_VARIABLES:
        values = [os.environ.get(name, "") for name in names]
        if values[0] not in UNNAMED_RUN_IDS:
            return ".".join(value for value in values if value)
    return None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process
        return True
    return True


class RunLock:
    """Held by the main rank from start to close; ``acquire`` raises RunDirBusy naming the holder."""

    def __init__(self, run_dir: str | Path, stale_minutes: float) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.stale_seconds = stale_minutes * 60
        self.holder = Holder.this_process()
        self._fd: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._create():
            self._take_over(self._read_holder())
            if not self._create():
                raise RunDirBusy(f"{self.path.parent} was taken by another job while this one started; try again")
        self._heartbeat = threading.Thread(target=self._beat, name="mimo-run-lock", daemon=True)
        self._heartbeat.start()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        os.write(fd, json.dumps(asdict(self.holder)).encode())
        os.fsync(fd)
        with contextlib.suppress(OSError):  # a filesystem without fcntl locks: the heartbeat alone speaks
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._fd = fd
        return True

    def _read_holder(self) -> Holder | None:
        try:
            return Holder(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):  # gone meanwhile, or written by hand
            return None

    def _take_over(self, holder: Holder | None) -> None:
        """Remove the lock of a dead holder, or raise RunDirBusy for a live one."""
        try:
            reason = self._dead_because(holder)
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:  # released meanwhile; _create will tell
            return
        if reason is None:
            raise RunDirBusy(
                f"{self.path.parent} is in use by another job ({holder.describe() if holder else 'unreadable lock'};"
                f" its lock {self.path} was"
                f" refreshed {age:.0f} s ago). Wait for that job to end, stop it, or choose another run.dir. If"
                f" it is dead, its lock is taken over once not refreshed for {self.stale_seconds / 60:g} minutes"
                " (fault.lock_stale_minutes), or delete the lock file yourself"
            )
        stale = self.path.with_name(f"{LOCK_FILE}.stale-{self.holder.host}-{self.holder.pid}")
        try:
            os.replace(self.path, stale)
        except FileNotFoundError:  # another job took it over first; _create will tell
            return
        stale.unlink()
        logger.warning("took over the lock of %s: %s", self.path.parent, reason)

    def _dead_because(self, holder: Holder | None) -> str | None:
        """Why the lock's holder is known to be gone, or None while it may be alive."""
        if self._held_elsewhere():
            return None
        age = time.time() - self.path.stat().st_mtime
        if holder is None:
            return f"unreadable lock file, last written {age:.0f} s ago" if age > self.stale_seconds else None
        if holder.job is not None and holder.job == self.holder.job:
            return f"it was held by an earlier run of this job ({holder.describe()})"
        if holder.host == self.holder.host and (holder.pid == self.holder.pid or not _pid_running(holder.pid)):
            return f"its holder is no longer running ({holder.describe()})"
        if age > self.stale_seconds:
            return f"its holder ({holder.describe()}) has not refreshed it for {age / 60:.1f} minutes"
        return None

    def _held_elsewhere(self) -> bool:
        """True only when an fcntl lock proves a live holder."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            return err.errno in (errno.EACCES, errno.EAGAIN)
        finally:
            os.close(fd)  # closing releases a lock this process just took
        return False

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):  # a filesystem hiccup; the next beat retries
                os.utime(self.path)

    def release(self) -> None:
        if self._heartbeat is not None:
            self._stop.set()
            self._heartbeat.join()
            self._heartbeat = None
        if self._fd is not None:
            if self._read_holder() == self.holder:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def lock_run_dir(run_dir: str | Path, stale_minutes: float, is_main: bool, device: torch.device) -> RunLock | None:
    """The main rank takes the run directory's lock; one all-reduce tells every rank whether it could, so a
    refused job stops on all ranks at once. Returns the lock on the main rank (release it at the end)."""
    lock, refusal = None, None
    if is_main:
        lock = RunLock(run_dir, stale_minutes)
        try:
            lock.acquire()
        except RunDirBusy as err:
            lock, refusal = None, err
    refused = torch.tensor([1.0 if refusal else 0.0], device=device)
    dist.all_reduce(refused, op=dist.ReduceOp.MAX)
    if refusal is not None:
        raise refusal
    if refused.item():
        raise RunDirBusy(f"{run_dir} is in use by another job (rank 0 says which)")
    return lock
