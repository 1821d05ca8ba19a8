"""What a checkpoint records about the run that wrote it, as typed dataclasses: the train state that a resume
restores, the parallel layout, and the stage settings, so a resume can say what changed.

The records are written to the checkpoint's JSON metadata in the flat form every mimo checkpoint has used
(``CheckpointMeta.to_json`` / ``from_json``): the train state's fields at the top level, ``layout`` as a dict of
degrees, ``run`` as ``{"train.seq_length": ..., "parallel.tp": ...}`` and ``model`` as the ModelConfig's fields.
"""

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from mimo.data.config import DataConfig
from mimo.model.config import ModelConfig

FORMAT_VERSION = 1


@dataclass
class TrainState:
    """Where the run is: restored exactly on resume so the schedule and data order continue seamlessly."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    stage: str = ""
    """The schedule stage the run was in; a resume into another stage is a stage transition."""
    data_stream: str = ""
    """What the samples are drawn from (mixture and sequence length); when it changes, a new stream starts."""
    data_start_samples: int = 0
    """consumed_samples when the current data stream began: the stream's own position is counted from here."""
    skipped_steps: int = 0
    """Steps whose update was skipped (non-finite numbers, loss spikes): they consumed their batch, not the
    schedule's tokens."""


@dataclass(frozen=True)
class LayoutRecord:
    """The layout a checkpoint is saved under, compared on resume to say what changed."""

    world_size: int
    tp: int
    pp: int
    vpp: int | None
    ep: int
    etp: int
    cp: int
    dp: int
    micro_batch_size: int
    distributed_optimizer: bool

    def settings(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunRecord:
    """Settings a stage transition may change, stored with each checkpoint so the next stage can say what did."""

    seq_length: int
    global_batch_size: int
    rope_theta: float
    swa_rope_theta: float
    blend: list[str]
    long_docs: dict[str, Any]
    layout: LayoutRecord

    @classmethod
    def of(cls, seq_length: int, global_batch_size: int, model: ModelConfig, data: DataConfig, layout: LayoutRecord):
        return cls(
            seq_length=seq_length,
            global_batch_size=global_batch_size,
            rope_theta=model.rope_theta,
            swa_rope_theta=model.swa_rope_theta,
            blend=list(data.blend),
            long_docs=asdict(data.long_docs),
            layout=layout,
        )

    def settings(self) -> dict[str, Any]:
        """The settings by config key, as the log names them."""
        return {
            "train.seq_length": self.seq_length,
            "train.global_batch_size": self.global_batch_size,
            "model.rope_theta": self.rope_theta,
            "model.swa_rope_theta": self.swa_rope_theta,
            "data.blend": self.blend,
            "data.long_docs": self.long_docs,
            **{f"parallel.{key}": value for key, value in self.layout.settings().items()},
        }


@dataclass
class CheckpointMeta:
    """Everything a checkpoint says about itself besides its tensors."""

    state: TrainState
    has_optimizer: bool
    world_size: int
    layout: dict[str, Any]
    """The saved LayoutRecord's settings (a dict: checkpoints of older mimo versions may lack fields)."""
    run: dict[str, Any]
    """The saved RunRecord's settings."""
    model: dict[str, Any]
    """The ModelConfig's fields (a dict: read back into a ModelConfig where needed)."""
    format: int = FORMAT_VERSION
    losses: list[tuple[int, float]] = field(default_factory=list)
    """The spike detector's window when the checkpoint was saved: (step, loss) of the recent accepted steps,
    oldest first. A resume carries the window on; a rollback picks a checkpoint from it."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Entries this version does not know, kept as read."""

    @classmethod
    def of(
        cls,
        state: TrainState,
        has_optimizer: bool,
        run: RunRecord,
        model: ModelConfig,
        losses: list[tuple[int, float]] | None = None,
    ) -> "CheckpointMeta":
        return cls(
            state=replace(state),
            has_optimizer=has_optimizer,
            world_size=run.layout.world_size,
            layout=run.layout.settings(),
            run=run.settings(),
            model=asdict(model),
            losses=list(losses or []),
        )

    def to_json(self) -> str:
        record = {
            "format": self.format,
            **asdict(self.state),
            "has_optimizer": self.has_optimizer,
            "world_size": self.world_size,
            "layout": self.layout,
            "run": self.run,
            "model": self.model,
            "losses": [list(pair) for pair in self.losses],
            **self.extra,
        }
        return json.dumps(record, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CheckpointMeta":
        """Raises ValueError (JSONDecodeError) for text that is not JSON."""
        record = json.loads(text)
        state_keys = {f.name for f in fields(TrainState)}
        known = state_keys | {"format", "has_optimizer", "world_size", "layout", "run", "model", "losses"}
        return cls(
            state=TrainState(**{key: record[key] for key in state_keys if key in record}),
            has_optimizer=record.get("has_optimizer", False),
            world_size=record.get("world_size", 0),
            layout=record.get("layout", {}),
            run=record.get("run", {}),
            model=record.get("model", {}),
            format=record.get("format"),
            losses=[(int(step), float(loss)) for step, loss in record.get("losses", [])],
            extra={key: value for key, value in record.items() if key not in known},
        )


def describe_changes(saved: dict[str, Any], current: dict[str, Any], separator: str = ": ") -> list[str]:
    """``key: old -> new`` for every setting of ``current`` that differs from what the checkpoint saved."""
    return [f"{key}{separator}{saved.get(key)} -> {value}" for key, value in current.items() if saved.get(key) != value]
