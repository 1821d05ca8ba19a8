"""Run, training, optimizer, schedule, checkpoint and logging settings: plain dataclasses, no torch.

The schedule's dataclasses live here so the recipes can compose them; ``mimo.train.schedule`` resolves them
against a run (token amounts, LR curve, stages).
"""

import math
from dataclasses import dataclass, field

from mimo.recipes.errors import ConfigError

RUN_CONFIG_FILE = "config.yaml"
"""The fully resolved config of a run, in its run directory."""
METRICS_FILE = "metrics.jsonl"
"""One JSON object per logged step, in the run directory."""
CHECKPOINTS_SUBDIR = "checkpoints"
"""``checkpoint.dir`` left empty means ``<run.dir>/checkpoints``."""


@dataclass
class RunConfig:
    dir: str = "runs/tiny"
    """Everything a run writes goes below this directory."""
    seed: int = 1234


@dataclass
class TrainConfig:
    steps: int = 300
    global_batch_size: int = 16
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 4
    """Sequences per forward/backward pass on one rank."""
    seq_length: int = 128
    stop_after_steps: int | None = None
    """Stop (after saving a checkpoint) once the run has reached this step, while every schedule still follows
    train.steps: for jobs sliced by a time limit, and for resume tests."""

    def validate(self) -> "TrainConfig":
        for key in ("steps", "global_batch_size", "micro_batch_size", "seq_length"):
            _require(getattr(self, key) >= 1, f"train.{key}={getattr(self, key)} must be at least 1")
        if self.stop_after_steps is not None:
            _require(
                self.stop_after_steps >= 1,
                f"train.stop_after_steps={self.stop_after_steps} must be at least 1 (or null: run to train.steps)",
            )
        return self


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate; schedule segments refer to it as "lr" (see mimo.train.schedule)."""
    min_lr: float = 3e-4
    """Final learning rate of the default schedule; segments refer to it as "min_lr"."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def validate(self) -> "OptimConfig":
        """Refuse values Adam cannot train with before the model is built (torch would fail only at its first
        step, or silently diverge)."""
        _require(_finite(self.lr) and self.lr > 0, f"optim.lr={self.lr} must be a positive number (e.g. 3e-4)")
        _require(_finite(self.min_lr) and self.min_lr >= 0, f"optim.min_lr={self.min_lr} must be zero or positive")
        _require(
            _finite(self.weight_decay) and self.weight_decay >= 0,
            f"optim.weight_decay={self.weight_decay} must be zero or positive",
        )
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            _require(_finite(value) and 0 <= value < 1, f"optim.{key}={value} must be in [0, 1) (e.g. 0.9, 0.95)")
        _require(_finite(self.adam_eps) and self.adam_eps > 0, f"optim.adam_eps={self.adam_eps} must be positive")
        _require(
            _finite(self.clip_grad) and self.clip_grad >= 0,
            f"optim.clip_grad={self.clip_grad} must be zero (no clipping) or positive",
        )
        return self


@dataclass
class CheckpointConfig:
    dir: str | None = None
    """None means <run.dir>/checkpoints."""
    interval: int = 100
    """Save every this many steps (and always at the end and on SIGTERM/SIGINT)."""
    keep: int = 2
    """Complete checkpoints kept on disk; older ones are deleted once a newer one is complete. The newest one and
    each stage's final one are never deleted."""
    async_save: bool = False
    """Write checkpoints in the background (megatron-core's persistent checkpoint worker): training continues
    while the files are written, and ``latest`` moves once every rank's write has finished."""

    def validate(self) -> "CheckpointConfig":
        _require(self.interval >= 1, f"checkpoint.interval={self.interval} must be at least 1 (steps between saves)")
        _require(self.keep >= 1, f"checkpoint.keep={self.keep} must be at least 1 (the newest checkpoint stays)")
        return self


SPIKE_POLICIES = ("log", "skip", "rollback", "stop")


@dataclass
class FaultConfig:
    """What a run does when a step goes wrong (``mimo.train.fault``): non-finite numbers, loss spikes, hangs, and
    a second job on the same run directory."""

    max_consecutive_skips: int = 5
    """After this many steps in a row were skipped (non-finite loss or gradients, or spikes under
    spike_policy=skip), the run saves its last good state and stops with an error."""
    spike_policy: str = "log"
    """What a loss spike does: log (warn, train on), skip (no update from that batch), rollback (reload the newest
    checkpoint before the spike and skip its data, as large runs have done) or stop (save and exit non-zero)."""
    spike_factor: float = 2.0
    """A step's loss above this many times the median of the recent accepted losses is a spike."""
    spike_window: int = 50
    """How many recent accepted losses the median is taken over; nothing is a spike before the window is full."""
    rollback_skip_batches: int = 200
    """spike_policy=rollback: the batches from the checkpoint through the spike are skipped, and this many more."""
    step_timeout_minutes: float | None = 60.0
    """A step (with its logging and checkpoint) running longer than this is a hang: every rank writes its Python
    stacks to <run.dir>/hang/ and the job exits non-zero, so a requeue resumes from the last checkpoint. null:
    no fixed limit."""
    step_timeout_median_factor: float | None = 20.0
    """Once a few steps were timed, a step taking this many times the median step is a hang too (whichever limit
    comes first; checkpoint saves are held to step_timeout_minutes only). null: off."""
    lock_stale_minutes: float = 10.0
    """The run directory's lock is refreshed every few seconds by the job holding it; one not refreshed for this
    long belongs to a dead job (lost node) and is taken over."""

    def validate(self) -> "FaultConfig":
        _require(
            self.max_consecutive_skips >= 1,
            f"fault.max_consecutive_skips={self.max_consecutive_skips} must be at least 1",
        )
        _require(
            self.spike_policy in SPIKE_POLICIES,
            f"fault.spike_policy={self.spike_policy!r}; choose one of {', '.join(SPIKE_POLICIES)}",
        )
        _require(_finite(self.spike_factor) and self.spike_factor > 1, "fault.spike_factor must be above 1")
        _require(self.spike_window >= 1, f"fault.spike_window={self.spike_window} must be at least 1")
        _require(self.rollback_skip_batches >= 0, "fault.rollback_skip_batches must be zero or positive")
        for key in ("step_timeout_minutes", "step_timeout_median_factor"):
            value = getattr(self, key)
            _require(value is None or (_finite(value) and value > 0), f"fault.{key}={value} must be positive or null")
        _require(
            _finite(self.lock_stale_minutes) and self.lock_stale_minutes > 0,
            f"fault.lock_stale_minutes={self.lock_stale_minutes} must be positive",
        )
        return self


@dataclass
class LoggingConfig:
    interval: int = 10
    progress_seconds: float = 30.0
    """During a step that runs longer than this, say every this many seconds how many micro-batches are done."""
    wandb: str = "off"
    """off | offline | online."""
    wandb_project: str = "mimo"


@dataclass
class EvalConfig:
    """Validation during training: the loss and MTP metrics of ``mimo-eval`` on the run's validation split."""

    interval: int = 50
    """Validate every this many steps and at the end of each schedule stage; 0: never."""
    iters: int = 4
    """Global batches (``train.global_batch_size`` sequences each) per validation: always the first ``iters *
    train.global_batch_size`` samples of the validation split, so every validation scores the same sequences."""

    def validate(self) -> "EvalConfig":
        if self.interval < 0 or self.iters < 1:
            raise ConfigError(
                f"eval.interval={self.interval}, eval.iters={self.iters}: the interval is a step count (0 turns "
                "validation off) and at least one batch is evaluated (eval.iters >= 1)"
            )
        return self


@dataclass
class ProfileConfig:
    """A torch profiler trace of a few steps, written below ``<run.dir>/profile/``."""

    steps: list[int] = field(default_factory=list)
    """[first, last]: the steps traced (inclusive); empty: no profiling."""
    ranks: list[int] = field(default_factory=lambda: [0])
    """The global ranks that write a trace."""
    memory_snapshot: bool = False
    """Also record a CUDA memory snapshot of those steps (GPU only)."""

    def validate(self) -> "ProfileConfig":
        if self.steps and not (len(self.steps) == 2 and 1 <= self.steps[0] <= self.steps[1]):
            raise ConfigError(
                f"profile.steps={list(self.steps)}: give [first, last] with 1 <= first <= last, e.g. "
                "profile.steps=[5,6], or [] for no profiling"
            )
        if any(rank < 0 for rank in self.ranks):
            raise ConfigError(f"profile.ranks={list(self.ranks)}: ranks are global process ranks (>= 0)")
        return self


TokenAmount = int | float | str
"""Tokens as a number, a suffixed string ("50B") or a percentage of the run ("10%")."""


@dataclass
class LRSegment:
    """One piece of the LR curve; segments follow each other from token 0, each starting where the last ended."""

    kind: str = "constant"
    """linear | constant | cosine (half-cosine from the start value down or up to ``target``)."""
    tokens: TokenAmount = 0
    """Length of the segment (see the module docstring for the forms)."""
    target: float | str | None = None
    """LR at the end of the segment: a number, "lr" or "min_lr". A constant segment holds the previous value
    and takes no target."""


@dataclass
class Stage:
    """A named span of tokens with its own loss weights and MoE balancing settings.

    Stages partition the token axis: each ends at ``end`` and starts where the previous one ended (token 0 for
    the first). A value left as None keeps the previous stage's value, and in the first stage the model
    config's value (``model.mtp_loss_weight`` etc.).
    """

    name: str = "main"
    end: TokenAmount = "100%"
    """Token count at which this stage ends (absolute on the run's token axis, not a length)."""
    mtp_loss_weight: float | None = None
    moe_router_bias_update_rate: float | None = None
    moe_aux_loss_coeff: float | None = None
    recipe: str | None = None
    """The recipe that trains this stage, optionally followed by overrides ("miniature miniature_stage=stage2");
    lets ``mimo-plan`` estimate every stage from its own settings."""


def _default_lr() -> list[LRSegment]:
    return [
        LRSegment(kind="linear", tokens="10%", target="lr"),
        LRSegment(kind="cosine", tokens="90%", target="min_lr"),
    ]


def _default_stages() -> list[Stage]:
    return [Stage()]


@dataclass
class ScheduleConfig:
    """The token-keyed schedule. The default warms up over 10% of the run to ``optim.lr`` and decays by a
    cosine to ``optim.min_lr`` at the end of ``train.steps``, with a fixed batch and one stage."""

    lr: list[LRSegment] = field(default_factory=_default_lr)
    """Consecutive segments from token 0; after the last one the LR stays at its final value."""
    batch_rampup_tokens: TokenAmount = 0
    """The global batch grows linearly from zero to ``train.global_batch_size`` over this many tokens (0: no
    ramp), rounded down to whole batch units and never below one unit."""
    stages: list[Stage] = field(default_factory=_default_stages)
    stage: str | None = None
    """The stage this run trains; it stops at that stage's end. None: the first stage."""


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
