"""Real ``mimo-train`` runs under several parallel layouts, and what the layout tests compare of them.

Every run is ``mimo.train.cli.main(overrides)``, the function behind ``mimo-train`` and ``python -m mimo.train``,
with its own process group and megatron parallel state. Starting a rank costs about 8 s of imports on a 2-core
machine, more than the 3-step run itself, so the ranks of one world size are spawned once and run their layouts
one after another (each run at its own rendezvous store, hosted by the test process: see tests/multirank.py);
single-rank runs run in the test process.
"""

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from mimo.train.tools.compare_layouts import relative_differences

from multirank import join_rendezvous, spawn_ranks

COMMON = (
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "logging.interval=1",
    "precision.dtype=fp32",
    "model.mtp_num_layers=1",
    # A rank that fails makes the others wait in a collective; let them give up within the test's patience.
    "parallel.timeout_minutes=3",
)
"""The tiny model with MTP in FP32, one seed, one global batch of 8 sequences (every layout divides it); each
test adds ``train.steps`` and its checkpoint settings."""


@dataclass
class Run:
    """One ``mimo-train`` invocation: its run directory and the overrides beyond ``COMMON``."""

    run_dir: Path
    overrides: Sequence[str]
    log: list[str] = field(default_factory=list)
    """The ``mimo`` logger's messages on rank 0, filled in once the run finished."""
    _checkpoints: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def argv(self, data_cache: Path) -> list[str]:
        return [f"run.dir={self.run_dir}", f"data.cache_dir={data_cache}", *COMMON, *self.overrides]

    def metrics(self) -> list[dict[str, float]]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    def checkpoint(self, step: int) -> dict[str, torch.Tensor]:
        """The tensors of the checkpoint saved at ``step`` (read once)."""
        if step not in self._checkpoints:
            self._checkpoints[step] = checkpoint_tensors(self.run_dir / "checkpoints" / f"step_{step:07d}")
        return self._checkpoints[step]


class RunFailed(RuntimeError):
    pass


@contextmanager
def captured_log() -> Iterator[list[str]]:
    """Collect the ``mimo`` logger's INFO messages, whether or not a command configured logging (the commands
    reconfigure the root logger, so hook in below it)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("mimo")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_single(run: Run, data_cache: Path) -> Run:
    """Run on one rank in this process."""
    from mimo.train.cli import main

    with captured_log() as lines:
        code = main(run.argv(data_cache))
    run.log = lines
    if code:
        raise RunFailed(f"single-rank run {run.overrides} exited with {code}:\n" + "\n".join(lines[-20:]))
    return run


def run_group(nproc: int, runs: Sequence[Run], data_cache: Path) -> Sequence[Run]:
    """Run ``runs`` in order on ``nproc`` spawned ranks; a failing run stops the group with its log."""
    with tempfile.TemporaryDirectory() as log_dir:
        argvs = [run.argv(data_cache) for run in runs]
        try:
            spawn_ranks(_rank_main, nproc, argvs, log_dir, rendezvous=len(runs))
        finally:
            for index, run in enumerate(runs):
                result = Path(log_dir) / f"{index}.json"
                if result.exists():
                    run.log = json.loads(result.read_text())["log"]
    return runs


def _rank_main(rank: int, ports: list[int], argvs: list[list[str]], log_dir: str) -> None:
    torch.set_num_threads(1)
    from mimo.train.cli import main

    for index, argv in enumerate(argvs):
        join_rendezvous(rank, int(os.environ["WORLD_SIZE"]), ports[index])
        with captured_log() as lines:
            code = main(argv)
        if rank == 0:
            (Path(log_dir) / f"{index}.json").write_text(json.dumps({"code": code, "log": lines}))
        if code:
            raise RunFailed(f"rank {rank}: run {argv} exited with {code}:\n" + "\n".join(lines[-20:]))


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint by its global name: the model's, the optimizer's (in megatron's reshardable
    model-space format) and the router's expert bias. Layout-dependent entries (per-rank RNG states, the linear
    layers' empty extra state) are not tensors and are left out."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "checkpoint.pt"
        dcp_to_torch_save(str(path), str(target))
        state = torch.load(target, weights_only=False)
    return {key: value for key, value in state.items() if torch.is_tensor(value)}


def worst_metric_difference(reference: list[dict[str, float]], records: list[dict[str, float]]) -> dict[str, float]:
    """The largest relative difference per logged metric (loss, lm/mtp/aux loss, grad norm), over the steps."""
    return {key: max(values) for key, values in relative_differences(reference, records).items()}


def tensor_differences(reference: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """|a - b| / |a| (Frobenius norms, in FP64) per tensor; both sides must hold the same names."""
    if reference.keys() != tensors.keys():
        only_reference = sorted(reference.keys() - tensors.keys())
        only_other = sorted(tensors.keys() - reference.keys())
        raise AssertionError(
            f"the checkpoints hold different tensors: only in the reference {only_reference},"
            f" only in the other {only_other}"
        )
    differences = {}
    for key, expected in reference.items():
        expected, actual = expected.double(), tensors[key].double()
        if expected.shape != actual.shape:
            raise AssertionError(f"{key}: shape {tuple(actual.shape)}, reference {tuple(expected.shape)}")
        differences[key] = ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()
    return differences
