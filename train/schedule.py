"""Everything that changes during training, as a pure function of the tokens consumed so far.

The MiMo-V2-Flash report states its schedule in tokens (warm-up over 50B tokens, batch ramp over 500B, stage
boundaries at 22T and 26T), not in steps, and the step count depends on the batch ramp and on how it is rounded
for a given layout. Keying every value on consumed tokens makes the schedule independent of the layout and makes
any resume (also into a later stage with another layout) reproduce the values exactly.

Token amounts in the config (``ScheduleConfig`` and its parts) are written as

* an integer or float number of tokens (``50000000000``, ``5.0e10``),
* a string with a decimal suffix K, M, B or T (``"50B"``, ``"22.05T"``; 1B = 10^9 tokens), or
* a percentage of the run, ``"10%"``, where the run is ``train.steps * train.global_batch_size *
  train.seq_length`` tokens. Percentages keep small recipes sensible under ``train.steps=...`` overrides.

LR targets are a number, ``"lr"`` (``optim.lr``, the peak) or ``"min_lr"`` (``optim.min_lr``), so overriding
``optim.lr`` or ``optim.min_lr`` moves every segment that refers to them.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from mimo.model.config import ModelConfig
from mimo.recipes.errors import MimoError
from mimo.train.config import LRSegment, OptimConfig, ScheduleConfig, Stage, TokenAmount, TrainConfig

TOKEN_SUFFIXES: dict[str, int] = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
LR_KINDS = ("linear", "constant", "cosine")
LR_REFERENCES = ("lr", "min_lr")
STAGE_VALUE_KEYS = ("mtp_loss_weight", "moe_router_bias_update_rate", "moe_aux_loss_coeff")


class ScheduleError(MimoError, ValueError):
    """A schedule config that cannot describe a run; the message names the key to fix."""


@dataclass(frozen=True)
class ScheduledValues:
    """Everything the training loop sets for one step."""

    lr: float
    global_batch_size: int
    """Sequences in this step, a whole multiple of the batch unit."""
    mtp_loss_weight: float
    moe_router_bias_update_rate: float
    moe_aux_loss_coeff: float


def parse_tokens(value: TokenAmount, *, run_tokens: int, key: str) -> int:
    """Turns a token amount from the config into an integer token count (decimal arithmetic, so "22.05T" is
    exact)."""
    if isinstance(value, bool):
        raise ScheduleError(f"{key}={value!r} is not a token amount; write e.g. 50B, 5.0e10 or 10%")
    if isinstance(value, int):
        tokens = Decimal(value)
    elif isinstance(value, float):
        tokens = Decimal(repr(value))
    else:
        text = value.strip().upper()
        try:
            if text.endswith("%"):
                tokens = Decimal(text[:-1]) * run_tokens / 100
            elif text[-1:] in TOKEN_SUFFIXES:
                tokens = Decimal(text[:-1]) * TOKEN_SUFFIXES[text[-1]]
            else:
                tokens = Decimal(text)
        except InvalidOperation as err:
            raise ScheduleError(
                f"{key}={value!r} is not a token amount; write a number, a number with a K/M/B/T suffix "
                f"(50B) or a percentage of the run (10%)"
            ) from err
    if tokens < 0:
        raise ScheduleError(f"{key}={value!r} is negative; token amounts are >= 0")
    return int(tokens.to_integral_value())


@dataclass(frozen=True)
class _Piece:
    kind: str
    start: int
    end: int
    start_lr: float
    end_lr: float


class Schedule:
    """The schedule resolved against one run's optimizer, training and model settings.

    ``batch_unit`` is the granularity of the global batch, micro_batch_size * data-parallel size; the loop
    knows the data-parallel size, so it passes the unit. None takes ``train.micro_batch_size`` (one
    data-parallel rank). ``model`` supplies the first stage's values that the stages leave unset.
    """

    def __init__(
        self,
        config: ScheduleConfig,
        *,
        optim: OptimConfig,
        train: TrainConfig,
        model: ModelConfig | None = None,
        batch_unit: int | None = None,
    ) -> None:
        self.run_tokens = train.steps * train.global_batch_size * train.seq_length
        self.seq_length = train.seq_length
        self.global_batch_size = train.global_batch_size
        self.batch_unit = train.micro_batch_size if batch_unit is None else batch_unit
        self._check_batch()
        self.rampup_tokens = parse_tokens(
            config.batch_rampup_tokens, run_tokens=self.run_tokens, key="schedule.batch_rampup_tokens"
        )
        self._pieces = self._resolve_lr(config.lr, optim)
        self._stage_names, self._stage_ends, self._stage_values = self._resolve_stages(config.stages, model)
        self.stage = self._resolve_current_stage(config.stage)

    # ----------------------------------------------------------------------------------------- construction

    def _check_batch(self) -> None:
        if self.batch_unit < 1:
            raise ScheduleError(f"batch unit {self.batch_unit} must be >= 1 (micro_batch_size * dp)")
        if self.global_batch_size % self.batch_unit:
            raise ScheduleError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of the batch unit "
                f"{self.batch_unit} (micro_batch_size * data-parallel size); choose a multiple of it"
            )

    def _resolve_lr(self, segments: Sequence[LRSegment], optim: OptimConfig) -> tuple[_Piece, ...]:
        if not segments:
            raise ScheduleError("schedule.lr is empty; give at least one segment (kind, tokens, target)")
        pieces = []
        start, lr = 0, 0.0
        for index, segment in enumerate(segments):
            key = f"schedule.lr[{index}]"
            if segment.kind not in LR_KINDS:
                raise ScheduleError(f"{key}.kind={segment.kind!r}; choose one of {', '.join(LR_KINDS)}")
            length = parse_tokens(segment.tokens, run_tokens=self.run_tokens, key=f"{key}.tokens")
            if length == 0:
                raise ScheduleError(f"{key}.tokens is 0; every segment needs a positive length")
            if segment.kind == "constant":
                if segment.target is not None:
                    raise ScheduleError(f"{key} is constant and holds the previous LR; remove its target")
                end_lr = lr
            else:
                end_lr = self._resolve_target(segment.target, optim, key=f"{key}.target")
            pieces.append(_Piece(segment.kind, start, start + length, lr, end_lr))
            start, lr = start + length, end_lr
        return tuple(pieces)

    @staticmethod
    def _resolve_target(target: float | str | None, optim: OptimConfig, *, key: str) -> float:
        if target is None:
            raise ScheduleError(f"{key} is missing; give a number, 'lr' (optim.lr) or 'min_lr' (optim.min_lr)")
        if isinstance(target, str):
            if target in LR_REFERENCES:
                return float(getattr(optim, target))
            try:
                return float(target)
            except ValueError as err:
                raise ScheduleError(
                    f"{key}={target!r}; give a number, 'lr' (optim.lr) or 'min_lr' (optim.min_lr)"
                ) from err
        return float(target)

    def _resolve_stages(
        self, stages: Sequence[Stage], model: ModelConfig | None
    ) -> tuple[tuple[str, ...], tuple[int, ...], tuple[tuple[float, ...], ...]]:
        if not stages:
            raise ScheduleError("schedule.stages is empty; give at least one stage with a name and an end")
        names, ends, values = [], [], []
        previous_end = 0
        current: list[float | None] = [
            None if model is None else float(getattr(model, name)) for name in STAGE_VALUE_KEYS
        ]
        for index, stage in enumerate(stages):
            key = f"schedule.stages[{index}]"
            if stage.name in names:
                raise ScheduleError(f"{key}.name={stage.name!r} is used twice; stage names must be unique")
            end = parse_tokens(stage.end, run_tokens=self.run_tokens, key=f"{key}.end")
            if end <= previous_end:
                raise ScheduleError(
                    f"{key}.end={stage.end!r} ({end} tokens) must be after the previous stage's end "
                    f"({previous_end} tokens)"
                )
            for slot, name in enumerate(STAGE_VALUE_KEYS):
                given = getattr(stage, name)
                if given is not None:
                    current[slot] = float(given)
                elif current[slot] is None:
                    raise ScheduleError(
                        f"{key}.{name} is unset and no model config was given to take it from; set it in "
                        f"the first stage or pass model= to Schedule"
                    )
            names.append(stage.name)
            ends.append(end)
            values.append(tuple(current))  # type: ignore[arg-type]  # all set, checked above
            previous_end = end
        return tuple(names), tuple(ends), tuple(values)

    def _resolve_current_stage(self, name: str | None) -> str:
        if name is None:
            return self._stage_names[0]
        if name not in self._stage_names:
            raise ScheduleError(
                f"schedule.stage={name!r} is not among schedule.stages ({', '.join(self._stage_names)})"
            )
        return name

    # ----------------------------------------------------------------------------------------------- queries

    def at(self, consumed_tokens: int) -> ScheduledValues:
        """The values for the step that starts after ``consumed_tokens`` tokens."""
        if consumed_tokens < 0:
            raise ValueError(f"consumed_tokens={consumed_tokens} is negative")
        mtp, bias_rate, aux = self._stage_values[self._stage_index(consumed_tokens)]
        return ScheduledValues(
            lr=self.lr_at(consumed_tokens),
            global_batch_size=self.batch_at(consumed_tokens),
            mtp_loss_weight=mtp,
            moe_router_bias_update_rate=bias_rate,
            moe_aux_loss_coeff=aux,
        )

    def lr_at(self, consumed_tokens: int) -> float:
        for piece in self._pieces:
            if consumed_tokens < piece.end:
                progress = (consumed_tokens - piece.start) / (piece.end - piece.start)
                if piece.kind == "linear":
                    return piece.start_lr + (piece.end_lr - piece.start_lr) * progress
                if piece.kind == "cosine":
                    return piece.end_lr + (piece.start_lr - piece.end_lr) * 0.5 * (1 + math.cos(math.pi * progress))
                return piece.start_lr
        return self._pieces[-1].end_lr

    def batch_at(self, consumed_tokens: int) -> int:
        """Global batch in sequences: linear in tokens during the ramp, rounded down to whole units."""
        if consumed_tokens >= self.rampup_tokens:
            return self.global_batch_size
        units = (self.global_batch_size * consumed_tokens) // (self.rampup_tokens * self.batch_unit)
        return max(1, units) * self.batch_unit

    def _stage_index(self, consumed_tokens: int) -> int:
        for index, end in enumerate(self._stage_ends):
            if consumed_tokens < end:
                return index
        return len(self._stage_ends) - 1

    @property
    def stages(self) -> dict[str, tuple[int, int]]:
        """Each stage's token span [start, end)."""
        starts = (0,) + self._stage_ends[:-1]
        return {name: (s, e) for name, s, e in zip(self._stage_names, starts, self._stage_ends)}

    @property
    def stage_span(self) -> tuple[int, int]:
        """The token span [start, end) this run trains."""
        return self.stages[self.stage]

    def finished(self, consumed_tokens: int) -> bool:
        """True once the run's stage is complete; the loop stops there (and saves)."""
        return consumed_tokens >= self.stage_span[1]

    def steps_between(self, start_tokens: int, end_tokens: int) -> int:
        """Optimizer steps that take the run from ``start_tokens`` to at least ``end_tokens`` consumed tokens,
        following the batch ramp. Steps are walked one by one only inside the ramp; after it they are counted
        in closed form."""
        steps, tokens = 0, start_tokens
        while tokens < min(end_tokens, self.rampup_tokens):
            tokens += self.batch_at(tokens) * self.seq_length
            steps += 1
        if tokens < end_tokens:
            step_tokens = self.global_batch_size * self.seq_length
            steps += -(-(end_tokens - tokens) // step_tokens)
        return steps
