"""The short training run with every observer on that several test modules read (the ``observed_run`` fixture)."""

from dataclasses import dataclass
from pathlib import Path

OBSERVED = (
    "train.steps=4",
    "logging.interval=1",
    "eval.interval=2",
    "eval.iters=1",
    "profile.steps=[2,3]",
)
"""Validation after steps 2 and 4 (the end of the stage), a profiler trace of steps 2-3, every step logged."""


def observed_config(run_dir: Path, data_cache: Path, *overrides: str):
    """The observed run's config, with ``overrides`` on top (for runs compared with it)."""
    from mimo.recipes import load_config

    return load_config([f"run.dir={run_dir}", f"data.cache_dir={data_cache}", *OBSERVED, *overrides])


@dataclass
class ObservedRun:
    run_dir: Path
    summary: object
    """The RunSummary that mimo.train.trainer.run_training returned."""
