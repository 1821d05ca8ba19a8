"""The rest of the bad-input battery: each case stops mimo-train with exit status 2 and a message naming the key or
file, never a traceback, and before the model is built."""

import re

import numpy
import pytest

from mimo.data.indexed import write_indexed
from mimo.train.cli import main

from layout_runs import Run, run_single


def refused(argv: list[str], capfd) -> str:
    """mimo-train's stderr for a run that must be refused with exit status 2."""
    code = main(argv)
    error = capfd.readouterr().err
    assert code == 2, error
    assert "Traceback" not in error and "Exception ignored" not in error, error
    return error


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=0", r"optim.lr=0.0 must be a positive number"),
        ("optim.lr=-3e-4", r"optim.lr=-0.0003 must be a positive number"),
        ("optim.lr=nan", r"optim.lr=nan must be a positive number"),
        ("optim.min_lr=-1", r"optim.min_lr=-1.0 must be zero or positive"),
        ("optim.adam_beta1=1.0", r"optim.adam_beta1=1.0 must be in \[0, 1\)"),
        ("optim.adam_beta2=-0.5", r"optim.adam_beta2=-0.5 must be in \[0, 1\)"),
        ("optim.adam_eps=0", r"optim.adam_eps=0.0 must be positive"),
        ("optim.weight_decay=-0.1", r"optim.weight_decay=-0.1 must be zero or positive"),
        ("optim.clip_grad=-1", r"optim.clip_grad=-1.0 must be zero \(no clipping\) or positive"),
        ("checkpoint.keep=0", r"checkpoint.keep=0 must be at least 1"),
        ("checkpoint.interval=0", r"checkpoint.interval=0 must be at least 1"),
        ("train.stop_after_steps=0", r"train.stop_after_steps=0 must be at least 1"),
        ("fault.spike_policy=retry", r"fault.spike_policy='retry'; choose one of log, skip, rollback, stop"),
        ("fault.spike_factor=1", r"fault.spike_factor must be above 1"),
    ],
)
def test_impossible_settings_are_refused_naming_the_key(tmp_path, override, message, capfd):
    error = refused([f"run.dir={tmp_path}", override], capfd)
    assert error.startswith("mimo-train: error: ")
    assert re.search(message, error), error
    assert not (tmp_path / "config.yaml").exists(), "refused before anything was written"


@pytest.mark.system
@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "no_documents"])
def test_a_damaged_index_is_refused_before_the_model_is_built(tmp_path, data_cache, capfd, damage):
    prefix = tmp_path / "data" / "web"
    write_indexed(str(prefix), [numpy.arange(1, 60, dtype=numpy.uint16)] * 200, numpy.uint16)
    index = prefix.with_suffix(".idx")
    raw = index.read_bytes()
    damaged = {
        "garbage": numpy.random.default_rng(0).bytes(len(raw)),
        "empty": b"",
        "truncated": raw[: len(raw) // 2],
        "no_documents": raw[:18] + bytes(16) + raw[34:],
    }[damage]
    index.write_bytes(damaged)
    error = refused(Run(tmp_path / "run", [f"data.blend=[{prefix}]"]).argv(data_cache), capfd)
    assert f"mimo-train: error: {index} is not a readable megatron-core index" in error


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, data_cache):
    """A run directory holding a checkpoint at step 2, saved with the distributed optimizer (the default)."""
    run_dir = tmp_path_factory.mktemp("resumable")
    return run_single(Run(run_dir, ["train.steps=4", "train.stop_after_steps=2"]), data_cache)


@pytest.mark.system
def test_stop_after_steps_at_or_below_the_resumed_step_stops_at_once(two_steps, data_cache, capfd):
    for stop in (1, 2):
        run = Run(two_steps.run_dir, ["train.steps=4", f"train.stop_after_steps={stop}"])
        error = refused(run.argv(data_cache), capfd)
        assert f"train.stop_after_steps={stop} is at or below step 2, where this run resumes from" in error
    assert (two_steps.run_dir / "checkpoints" / "latest").read_text() == "step_0000002"


@pytest.mark.system
def test_switching_the_distributed_optimizer_across_a_resume_names_the_key(two_steps, data_cache, capfd):
    argv = Run(two_steps.run_dir, ["train.steps=4", "parallel.distributed_optimizer=false"]).argv(data_cache)
    error = refused(argv, capfd)
    assert "parallel.distributed_optimizer=false, but" in error
    assert "set parallel.distributed_optimizer=true to resume this run" in error
