"""Run, training, optimizer, schedule, checkpoint and logging settings: plain dataclasses, no torch.

The schedule's dataclasses live here so the recipes can compose them; ``mimo.train.schedule`` resolves them
against a run (token amounts, LR curve, stages).
"""

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


@dataclass
class CheckpointConfig:
    dir: str | None = None
    """None means <run.dir>/checkpoints."""
    interval: int = 100
    """Save every this many steps (and always at the end and on SIGTERM/SIGINT)."""
    keep: int = 2
    """Complete checkpoints kept on disk; older ones are deleted once a newer one is complete."""


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
