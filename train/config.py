"""Run, training, optimizer, checkpoint and logging settings."""

from dataclasses import dataclass


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
