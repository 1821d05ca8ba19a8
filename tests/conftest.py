"""Shared fixtures: one data-index cache for the whole session (each test trains instead of tokenizing), a
single-rank runtime, the tiny Hub checkpoint and its import, and one short training run with every observer on."""

import pytest

from mimo.model.config import ModelConfig
from mimo.parallel.config import ParallelConfig
from mimo.parallel.runtime import initialize, shutdown
from mimo.train.commands import quiet_expected_warnings

from observed import ObservedRun, observed_config

quiet_expected_warnings()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def single_rank():
    """megatron's parallel state for one process (no parallelism), for tests that build models directly."""
    initialize(ParallelConfig(), ModelConfig(), seed=0, global_batch_size=1, micro_batch_size=1, seq_length=1)
    yield
    shutdown()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A random tiny transformers MiMo-V2-Flash saved in Hub format, with an MTP block (tests/tiny_hub.py)."""
    from tiny_hub import make_tiny_hub

    return make_tiny_hub(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="module")
def imported(hub, tmp_path_factory):
    """The tiny Hub checkpoint imported into a mimo run directory (``mimo-convert import-hf``)."""
    from mimo.train.tools.convert.importer import import_hf

    from tiny_hub import IMPORT_OVERRIDES

    out = tmp_path_factory.mktemp("runs") / "imported"
    import_hf(hub.directory, out, IMPORT_OVERRIDES)
    return out


@pytest.fixture(scope="session")
def observed_run(tmp_path_factory, data_cache) -> ObservedRun:
    """A single-rank mimo-train run of the tiny model with validation, MoE load, MFU and the profiler on."""
    from mimo.train.trainer import run_training

    run_dir = tmp_path_factory.mktemp("observed")
    return ObservedRun(run_dir, run_training(observed_config(run_dir, data_cache)))
