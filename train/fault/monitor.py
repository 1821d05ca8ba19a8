"""The run's fault policy, applied step by step: whether a step's update is applied (the numerical guard and the
spike policy) and what the training loop does next (train on, roll back, stop).

Every rank holds a monitor and feeds it the same all-reduced loss and gradient flags, so every rank takes the same
decision without another collective. Only the main rank logs.
"""

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from mimo.train.config import FaultConfig
from mimo.train.fault.guard import NonFinite
from mimo.train.fault.spikes import Spike, SpikeDetector
from mimo.train.step import StepResult

logger = logging.getLogger("mimo")

DIVERGED_ADVICE = (
    "try a lower optim.lr or a longer warm-up (schedule.lr), gradient clipping (optim.clip_grad=1.0),"
    " precision.dtype=fp32 to see whether bf16 overflows, or a look at the skipped batches' data; resuming this"
    " run directory continues from the saved state with the next batches"
)


class Action(Enum):
    CONTINUE = "continue"
    ROLLBACK = "rollback"
    STOP = "stop"


@dataclass(frozen=True)
class Decision:
    """What the training loop does after a step."""

    action: Action
    reason: str = ""
    """For STOP: why, and what to try (the error message, completed with the saved checkpoint)."""
    spike: Spike | None = None
    """For ROLLBACK: the spike rolled back from."""


CONTINUE = Decision(Action.CONTINUE)


class FaultMonitor:
    def __init__(self, cfg: FaultConfig, is_main: bool, history: Iterable[tuple[int, float]] = ()) -> None:
        self.cfg = cfg
        self.is_main = is_main
        self.spikes = SpikeDetector(cfg.spike_window, cfg.spike_factor, history)
        self.consecutive_skips = 0
        self._skipped: list[str] = []
        self.step = 0
        self.decision = CONTINUE

    def restart(self, history: Iterable[tuple[int, float]]) -> None:
        """After a rollback: the window of the checkpoint returned to, and no skips in a row."""
        self.spikes = SpikeDetector(self.cfg.spike_window, self.cfg.spike_factor, history)
        self.consecutive_skips = 0
        self._skipped.clear()

    def history(self) -> list[tuple[int, float]]:
        """The recent accepted losses, for the next checkpoint's metadata."""
        return self.spikes.history()

    def begin(self, step: int) -> None:
        self.step = step
        self.decision = CONTINUE

    def approve(self, result: StepResult) -> bool:
        """Whether step ``self.step`` may update the model (``StepHooks.approve``)."""
        nonfinite = NonFinite.of(result.loss, result.nonfinite_gradient_ranks)
        if nonfinite is not None:
            return self._skip(nonfinite.describe())
        spike = self.spikes.check(self.step, result.loss)
        if spike is None:
            self.spikes.accept(self.step, result.loss)
            self.consecutive_skips = 0
            self._skipped.clear()
            return True
        policy = self.cfg.spike_policy
        self._warn("loss spike: %s (fault.spike_policy=%s)", spike.describe(), policy)
        if policy == "log":
            return True
        if policy == "rollback":
            self.decision = Decision(Action.ROLLBACK, spike=spike)
        elif policy == "stop":
            self.decision = Decision(
                Action.STOP,
                f"stopped on a loss spike (fault.spike_policy=stop): {spike.describe()}; the update of step"
                f" {self.step} was not applied. Look at the data of that step, then resume (its batch is skipped),"
                " or choose fault.spike_policy=rollback or skip",
            )
        return self._skip(f"a loss spike ({spike.loss:.4f} > {spike.limit:.4f})")

    def _skip(self, what: str) -> bool:
        self.consecutive_skips += 1
        self._skipped.append(f"step {self.step}: {what}")
        self._warn(
            "step %d: %s: update skipped, the model and optimizer are unchanged and the batch is not retried"
            " (%d in a row; fault.max_consecutive_skips=%d)",
            self.step,
            what,
            self.consecutive_skips,
            self.cfg.max_consecutive_skips,
        )
        if self.consecutive_skips >= self.cfg.max_consecutive_skips and self.decision.action is not Action.STOP:
            self.decision = Decision(
                Action.STOP,
                f"the run diverged: {self.consecutive_skips} steps in a row were skipped"
                f" ({'; '.join(self._skipped)}); the model is left as after the last good step. {DIVERGED_ADVICE}",
            )
        return False

    def _warn(self, message: str, *args) -> None:
        if self.is_main:
            logger.warning(message, *args)
