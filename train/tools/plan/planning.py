"""The plan of a recipe on a cluster: layout, memory, communication and time together, and, for a layout that
does not fit, the single changes that would make it fit."""

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from mimo.model import accounting
from mimo.parallel.layout import ResolvedLayout
from mimo.recipes.schema import MimoConfig
from mimo.train.tools.plan.activations import Recompute, describe_recompute, recompute_of
from mimo.train.tools.plan.communication import Traffic, communication
from mimo.train.tools.plan.memory import MemoryEstimate, estimate_memory
from mimo.train.tools.plan.settings import GpuSpec, PlanError, PlannerSettings, resolve_layout
from mimo.train.tools.plan.timing import StageTime, stage_times, tokens_per_second


@dataclass(frozen=True)
class Suggestion:
    change: str
    peak_bytes: int
    fits: bool


@dataclass(frozen=True)
class Plan:
    recipe: str
    overrides: tuple[str, ...]
    gpu: GpuSpec
    world_size: int
    mfu: float
    layout: ResolvedLayout
    recompute: Recompute
    params: accounting.ParameterCounts
    flops: accounting.FlopsPerToken
    memory: MemoryEstimate
    traffic: tuple[Traffic, ...]
    tokens_per_s: float
    step_tokens: int
    stages: tuple[StageTime, ...]
    suggestions: tuple[Suggestion, ...] = field(default_factory=tuple)

    @property
    def runs(self) -> bool:
        return self.memory.fits

    @property
    def step_seconds(self) -> float:
        return self.step_tokens / self.tokens_per_s


def make_plan(
    cfg: MimoConfig,
    *,
    world_size: int,
    gpu: GpuSpec,
    settings: PlannerSettings = PlannerSettings(),
    recipe: str = "config",
    overrides: Sequence[str] = (),
) -> Plan:
    layout = resolve_layout(cfg, world_size)
    memory = estimate_memory(cfg, world_size=world_size, gpu=gpu, settings=settings, layout=layout)
    plan = Plan(
        recipe=recipe,
        overrides=tuple(overrides),
        gpu=gpu,
        world_size=world_size,
        mfu=settings.mfu,
        layout=layout,
        recompute=recompute_of(cfg),
        params=accounting.parameter_counts(cfg.model),
        flops=accounting.flops_per_token(cfg.model, cfg.train.seq_length),
        memory=memory,
        traffic=communication(cfg, layout, gpu),
        tokens_per_s=tokens_per_second(cfg.model, cfg.train.seq_length, world_size, gpu, settings.mfu),
        step_tokens=cfg.train.global_batch_size * cfg.train.seq_length,
        stages=stage_times(cfg, world_size, gpu, settings, overrides),
    )
    if not memory.fits:
        plan = replace(plan, suggestions=suggest(cfg, world_size=world_size, gpu=gpu, settings=settings))
    return plan


FULL_RECOMPUTE = Recompute(granularity="full", method="uniform", num_layers=1)
SELECTIVE_RECOMPUTE = Recompute(granularity="selective", modules=("layernorm", "moe_act"))


@dataclass(frozen=True)
class _Change:
    label: str
    values: dict[str, object] = field(default_factory=dict)
    """Dotted config keys and their new values."""
    recompute: Recompute | None = None


def _candidate_changes(cfg: MimoConfig) -> list[_Change]:
    """Single changes that lower the memory per GPU."""
    p, t = cfg.parallel, cfg.train
    changes = [
        _Change(f"parallel.{key}={getattr(p, key) * 2}", {f"parallel.{key}": getattr(p, key) * 2})
        for key in ("pp", "ep", "tp", "cp")
    ]
    if t.micro_batch_size > 1:
        half = t.micro_batch_size // 2
        changes.append(_Change(f"train.micro_batch_size={half}", {"train.micro_batch_size": half}))
    if not p.distributed_optimizer:
        changes.append(_Change("parallel.distributed_optimizer=true", {"parallel.distributed_optimizer": True}))
    if p.vpp is not None:
        changes.append(_Change("parallel.vpp=null", {"parallel.vpp": None}))
    current = recompute_of(cfg)
    for option in (FULL_RECOMPUTE, SELECTIVE_RECOMPUTE):
        if option.granularity != current.granularity:
            changes.append(_Change(f"{describe_recompute(option)} activation recomputation", recompute=option))
    return changes


def _with_changes(cfg: MimoConfig, values: dict[str, object]) -> MimoConfig:
    sections: dict[str, dict[str, object]] = {}
    for key, value in values.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    return replace(cfg, **{s: replace(getattr(cfg, s), **v) for s, v in sections.items()})


def suggest(
    cfg: MimoConfig, *, world_size: int, gpu: GpuSpec, settings: PlannerSettings = PlannerSettings()
) -> tuple[Suggestion, ...]:
    """Each single change (and twice the GPUs) that gives a valid layout, with the peak it leads to; the ones
    that fit first."""
    options = []
    for change in _candidate_changes(cfg):
        try:
            estimate = estimate_memory(
                _with_changes(cfg, change.values),
                world_size=world_size,
                gpu=gpu,
                settings=settings,
                recompute=change.recompute,
            )
        except PlanError:
            continue
        options.append(Suggestion(change.label, estimate.peak.total, estimate.fits))
    try:
        estimate = estimate_memory(cfg, world_size=2 * world_size, gpu=gpu, settings=settings)
        options.append(Suggestion(f"--world-size {2 * world_size}", estimate.peak.total, estimate.fits))
    except PlanError:
        pass
    return tuple(sorted(options, key=lambda option: (not option.fits, option.peak_bytes)))
