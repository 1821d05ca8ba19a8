"""Checkpoint benchmark: save and load throughput against this disk's own bandwidth, and how long a background
save (``checkpoint.async_save``) holds training up against a synchronous save, in one process run.

The model is the tiny MiMo shape widened (``MODEL``) to about 60M parameters, so that its weights and Adam moments
make a checkpoint of several hundred MB, trained for one step so the optimizer state is real.

1. Disk: the checkpoint's bytes written as large blocks with an fsync (as megatron-core's writer does) and read
   back, ``dd``-style; the page cache is dropped for these files (``posix_fadvise``) before every read.
2. Synchronous save (``CheckpointManager.save``: health check, shards, metadata, rename) and load
   (``load_checkpoint``: shard check and tensors into the model and optimizer). Goal: save >= 0.5x the disk.
3. Background save: the time ``save`` blocks the training loop (staging the tensors for the persistent worker)
   against the synchronous save. Goal: <= 0.1x. The first background save also starts the worker process and is
   reported apart; so is the training step that runs while a write is in flight (both processes share the CPU).

Run: python bench/bench_checkpoint.py [--repeats N] [--dir DIR]
"""

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from mimo.recipes import load_config
from mimo.train.checkpoint.health import state_is_finite
from mimo.train.checkpoint.manager import CheckpointManager, load_checkpoint
from mimo.train.checkpoint.storage import OPTIMIZER_SHARDING, unwrapped
from mimo.train.commands import quiet_expected_warnings, setup_logging
from mimo.train.trainer import Trainer

MODEL = (
    "model.hidden_size=512",
    "model.vocab_size=32768",
    "model.ffn_hidden_size=2048",
    "model.moe_ffn_hidden_size=512",
    "precision.dtype=fp32",
)
BLOCK_BYTES = 64 * 1024 * 1024
"""Write and read size of the disk baseline."""
SAVE_GOAL = 0.5
ASYNC_BLOCKING_GOAL = 0.1


def _files(directory: Path) -> list[Path]:
    return [path for path in directory.rglob("*") if path.is_file()]


def _drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_write_read(directory: Path, nbytes: int) -> tuple[float, float]:
    """Seconds to write ``nbytes`` in large blocks with an fsync, then to read them back from disk."""
    path = directory / "disk_baseline.bin"
    block = os.urandom(BLOCK_BYTES)
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as stream:
        for offset in range(0, nbytes, BLOCK_BYTES):
            stream.write(block[: min(BLOCK_BYTES, nbytes - offset)])
        os.fsync(stream.fileno())
    written = time.perf_counter() - start
    _drop_cache([path])
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as stream:
        while stream.read(BLOCK_BYTES):
            pass
    read = time.perf_counter() - start
    path.unlink()
    return written, read


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


@dataclass
class Subject:
    """A trained model and optimizer, and checkpoint managers writing them below ``work``."""

    trainer: Trainer
    work: Path

    def manager(self, name: str, async_save: bool) -> CheckpointManager:
        cfg = self.trainer.cfg
        checkpoint = replace(cfg.checkpoint, dir=str(self.work / name), async_save=async_save, keep=1)
        return CheckpointManager(checkpoint, cfg.model, self.trainer.runtime.device)

    def save(self, checkpoints: CheckpointManager) -> Path:
        trainer = self.trainer
        return checkpoints.save(trainer.state, trainer.chunks, trainer.optimizer, trainer.record)

    def load(self, path: Path) -> None:
        load_checkpoint(path, self.trainer.chunks, self.trainer.optimizer, self.trainer.cfg.model)


def bench_sync(subject: Subject, repeats: int) -> float:
    """Save and load against the disk; returns the best synchronous save time."""
    sync = subject.manager("sync", async_save=False)
    save_s, load_s = [], []
    for _ in range(repeats):
        save_s.append(timed(lambda: subject.save(sync)))
        latest = sync.latest()
        _drop_cache(_files(latest))
        load_s.append(timed(partial(subject.load, latest)))
    nbytes = sum(path.stat().st_size for path in _files(sync.latest()))
    disk = [disk_write_read(subject.work, nbytes) for _ in range(repeats)]
    disk_write, disk_read = min(seconds for seconds, _ in disk), min(seconds for _, seconds in disk)
    mb = nbytes / 1e6
    params = sum(param.numel() for chunk in subject.trainer.chunks for param in chunk.parameters())
    print(f"checkpoint: {mb:,.0f} MB ({params / 1e6:.1f}M parameters with their Adam moments)")
    print(f"disk write (fsync): {mb / disk_write:,.0f} MB/s; disk read (cache dropped): {mb / disk_read:,.0f} MB/s")
    save, load = min(save_s), min(load_s)
    print(f"save: {mb / save:,.0f} MB/s = {disk_write / save:.2f}x disk write (goal >= {SAVE_GOAL})")
    print(f"load: {mb / load:,.0f} MB/s = {disk_read / load:.2f}x disk read")
    return save


def preparation(subject: Subject) -> tuple[float, float]:
    """Seconds of two parts of every save, synchronous or not, that run before anything is written: the health
    check, and assembling the optimizer's fully_reshardable state (megatron gathers each parameter's Adam state
    over the data-parallel ranks and reshapes it to the parameter's shape)."""
    trainer = subject.trainer
    health = timed(lambda: state_is_finite(trainer.chunks, trainer.optimizer, trainer.runtime.device))
    model = {f"model{i}": unwrapped(chunk).sharded_state_dict(metadata={}) for i, chunk in enumerate(trainer.chunks)}
    optimizer_state = timed(
        lambda: trainer.optimizer.sharded_state_dict(model, is_loading=False, metadata=OPTIMIZER_SHARDING)
    )
    return health, optimizer_state


def bench_async(subject: Subject, repeats: int, sync_save: float) -> None:
    background = subject.manager("async", async_save=True)
    try:
        first = timed(lambda: subject.save(background))
        background.wait()
        blocking, writing = [], []
        for _ in range(repeats):
            blocking.append(timed(lambda: subject.save(background)))
            writing.append(timed(background.wait))
        quiet_step = timed(subject.trainer.step)
        subject.save(background)
        busy_step = timed(subject.trainer.step)
    finally:
        background.close()
    block = min(blocking)
    print(
        f"background save blocks {block:.3f} s against {sync_save:.3f} s synchronous = {block / sync_save:.3f}x"
        f" (goal <= {ASYNC_BLOCKING_GOAL}); the worker then writes for {min(writing):.2f} s more"
    )
    parts = [preparation(subject) for _ in range(repeats)]
    health, optimizer_state = min(part[0] for part in parts), min(part[1] for part in parts)
    print(
        f"  of which, in every save: health check {health:.3f} s, optimizer state assembly {optimizer_state:.3f} s;"
        f" staging for the worker and planning {block - health - optimizer_state:.3f} s"
    )
    print(f"first background save (also starts the worker process): blocks {first:.2f} s")
    print(f"a training step while a background write runs: {busy_step / quiet_step:.2f}x a step without one")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each side; the best counts")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    quiet_expected_warnings()
    setup_logging(is_main=False)
    with tempfile.TemporaryDirectory(prefix="mimo_bench_ckpt_", dir=args.dir) as tmp:
        work = Path(tmp)
        cfg = load_config([f"run.dir={work / 'run'}", "train.steps=100", *MODEL])
        with Trainer(cfg) as trainer:
            trainer.step()
            subject = Subject(trainer, work)
            sync_save = bench_sync(subject, args.repeats)
            bench_async(subject, args.repeats, sync_save)


if __name__ == "__main__":
    main()
