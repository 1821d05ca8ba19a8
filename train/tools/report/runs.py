"""What ``mimo-report`` reads of a run directory: the rows of ``metrics.jsonl`` and the stages of ``config.yaml``.

Runs that are still going and runs written by older mimo versions are read as they are: a last line cut off
mid-write is left out, a step logged twice (a resumed run repeats the steps after its last checkpoint) keeps its
latest row, and a config that no longer composes only costs the stage boundaries.
"""

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mimo.recipes.errors import MimoError
from mimo.recipes.schema import MimoConfig
from mimo.train.config import METRICS_FILE, RUN_CONFIG_FILE
from mimo.train.schedule import Schedule, ScheduleError

Row = dict[str, Any]


class ReportError(MimoError, ValueError):
    """A run directory mimo-report cannot read; the message names the file."""


@dataclass
class Run:
    name: str
    directory: Path
    rows: list[Row]
    """One per logged step, in step order."""
    stages: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Each schedule stage's token span [start, end), from config.yaml; empty when it could not be read."""
    train_steps: int | None = None
    moe_layers: list[int] = field(default_factory=list)
    """Decoder layers of the MoE layers, to label the expert-load rows (empty when the config is unreadable: the
    rows are then numbered from 0)."""
    notes: list[str] = field(default_factory=list)
    """What could not be read, for the summary."""

    def has(self, key: str) -> bool:
        return any(row.get(key) is not None for row in self.rows)

    def series(self, key: str) -> tuple[list[int], list[Any]]:
        """(tokens, values) of the rows that have ``key``."""
        rows = [row for row in self.rows if row.get(key) is not None]
        return [row["tokens"] for row in rows], [row[key] for row in rows]

    def last(self, key: str) -> Any:
        values = self.series(key)[1]
        return values[-1] if values else None

    def recent_mean(self, key: str, rows: int) -> float | None:
        """Mean over the last ``rows`` rows that have ``key``, leaving out step 1 (start-up) when others exist."""
        values = [row[key] for row in self.rows if row.get(key) is not None and row["step"] > 1]
        return statistics.fmean(values[-rows:]) if values else None

    @property
    def status(self) -> str:
        step, tokens = self.rows[-1]["step"], self.rows[-1]["tokens"]
        stage_ends = [end for _, end in self.stages.values()]
        if step == self.train_steps or tokens in stage_ends:
            return "finished"
        return f"running or stopped (last logged step {step})"


def read_rows(path: Path) -> list[Row]:
    if not path.exists():
        raise ReportError(f"{path} does not exist; give run directories that mimo-train wrote (run.dir)")
    lines = path.read_text().splitlines()
    by_step: dict[int, Row] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                continue  # the writer is in the middle of this line
            raise ReportError(f"{path}:{number}: not JSON ({err}); the file is damaged") from err
        by_step[row["step"]] = row
    if not by_step:
        raise ReportError(f"{path} holds no logged step yet; run mimo-report once the run has logged one")
    return [by_step[step] for step in sorted(by_step)]


def read_config(path: Path) -> MimoConfig:
    """A run's config.yaml over the current schema (keys a newer mimo added take their defaults)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MimoConfig), OmegaConf.load(path)))


def read_run(directory: Path, name: str) -> Run:
    run = Run(name, directory, read_rows(directory / METRICS_FILE))
    config = directory / RUN_CONFIG_FILE
    if not config.exists():
        run.notes.append(f"{name}: no {RUN_CONFIG_FILE}; stage boundaries are not marked")
        return run
    try:
        cfg = read_config(config)
        run.stages = Schedule(cfg.schedule, optim=cfg.optim, train=cfg.train, model=cfg.model).stages
        run.train_steps = cfg.train.steps
        run.moe_layers = cfg.model.moe_layers()
    except (OmegaConfBaseException, ScheduleError, MimoError) as err:
        run.notes.append(f"{name}: {config} does not compose with this mimo ({err}); stage boundaries are not marked")
    return run


def run_names(directories: list[Path]) -> list[str]:
    """Each run's directory name, or more of its path where two runs share a name."""
    names = [directory.name for directory in directories]
    if len(set(names)) == len(names):
        return names
    return [str(directory) for directory in directories]


def read_runs(directories: list[Path]) -> list[Run]:
    return [read_run(directory, name) for directory, name in zip(directories, run_names(directories))]
