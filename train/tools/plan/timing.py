"""Tokens per second at a stated MFU, and the days and steps of every schedule stage (each from its own recipe)."""

from collections.abc import Sequence
from dataclasses import dataclass

from mimo.model import accounting
from mimo.model.config import ModelConfig
from mimo.recipes.compose import load_config
from mimo.recipes.errors import ConfigError
from mimo.recipes.schema import MimoConfig
from mimo.train.schedule import Schedule, ScheduleError
from mimo.train.tools.plan.settings import SECONDS_PER_DAY, GpuSpec, PlanError, PlannerSettings, resolve_layout


@dataclass(frozen=True)
class StageTime:
    name: str
    recipe: str | None
    start_tokens: int
    end_tokens: int
    seq_length: int
    tokens_per_s: float
    days: float
    steps: int | None
    """Optimizer steps of the stage under its recipe's layout (None when that layout does not resolve)."""
    current: bool
    """The stage this recipe trains."""


def tokens_per_second(model: ModelConfig, seq_length: int, world_size: int, gpu: GpuSpec, mfu: float) -> float:
    return world_size * gpu.bf16_tflops * 1e12 * mfu / accounting.flops_per_token(model, seq_length).training


def _schedule(cfg: MimoConfig, world_size: int) -> tuple[Schedule, int | None]:
    """The run's schedule and batch unit (None when the layout does not resolve: then unit = micro batch)."""
    try:
        unit: int | None = cfg.train.micro_batch_size * resolve_layout(cfg, world_size).dp
    except PlanError:
        unit = None
    try:
        schedule = Schedule(cfg.schedule, optim=cfg.optim, train=cfg.train, model=cfg.model, batch_unit=unit)
    except ScheduleError as err:
        raise PlanError(f"schedule refused: {err}") from err
    return schedule, unit


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def stage_times(
    cfg: MimoConfig, world_size: int, gpu: GpuSpec, settings: PlannerSettings, overrides: Sequence[str]
) -> tuple[StageTime, ...]:
    """Every stage of the schedule, each estimated from its own recipe when the schedule names one (with this
    run's overrides, except those the stage's recipe entry sets itself), else from this recipe."""
    schedule, _ = _schedule(cfg, world_size)
    times = []
    for stage in cfg.schedule.stages:
        stage_cfg = cfg
        if stage.recipe and stage.name != schedule.stage:
            name, *stage_overrides = stage.recipe.split()
            own_keys = {_override_key(item) for item in stage_overrides}
            shared = [item for item in overrides if _override_key(item) not in own_keys]
            try:
                stage_cfg = load_config([*shared, *stage_overrides], config_name=name)
            except ConfigError as err:
                raise PlanError(
                    f"schedule stage {stage.name!r} names recipe {stage.recipe!r}, which fails: {err}"
                ) from err
        stage_schedule, unit = _schedule(stage_cfg, world_size)
        start, end = schedule.stages[stage.name]
        speed = tokens_per_second(stage_cfg.model, stage_cfg.train.seq_length, world_size, gpu, settings.mfu)
        times.append(
            StageTime(
                name=stage.name,
                recipe=stage.recipe,
                start_tokens=start,
                end_tokens=end,
                seq_length=stage_cfg.train.seq_length,
                tokens_per_s=speed,
                days=(end - start) / speed / SECONDS_PER_DAY,
                steps=stage_schedule.steps_between(start, end) if unit is not None else None,
                current=stage.name == schedule.stage,
            )
        )
    return tuple(times)
