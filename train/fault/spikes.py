"""Loss-spike detection: a step's loss above ``fault.spike_factor`` times the median of the last
``fault.spike_window`` accepted losses.

The median, not the mean, so that one spike that got through (``spike_policy=log``) does not hide the next; only
accepted steps enter the window, so a spike never raises its own bar. The window is saved with every checkpoint
(``CheckpointMeta.losses``) and restored on resume, so detection carries on across jobs; a new data stream (a stage
transition) starts an empty one, since its losses are not comparable with the last stage's.
"""

import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Spike:
    step: int
    loss: float
    median: float
    limit: float
    """The loss above which a step counted as a spike (factor x median)."""

    def describe(self) -> str:
        return (
            f"loss {self.loss:.4f} at step {self.step} is above {self.limit:.4f}"
            f" ({self.loss / self.median:.2f}x the median {self.median:.4f} of the recent steps)"
        )


class SpikeDetector:
    def __init__(self, window: int, factor: float, history: Iterable[tuple[int, float]] = ()) -> None:
        self.factor = factor
        self._recent: deque[tuple[int, float]] = deque(((int(s), float(v)) for s, v in history), maxlen=window)

    def check(self, step: int, loss: float) -> Spike | None:
        """The spike this loss is, or None (also while the window is still filling)."""
        limit = self.limit()
        return Spike(step, loss, limit / self.factor, limit) if limit is not None and loss > limit else None

    def accept(self, step: int, loss: float) -> None:
        self._recent.append((step, loss))

    def history(self) -> list[tuple[int, float]]:
        """The window as (step, loss) pairs, oldest first: what a checkpoint records."""
        return list(self._recent)

    def limit(self) -> float | None:
        """The current spike limit, or None while the window is filling."""
        if len(self._recent) < self._recent.maxlen:
            return None
        return self.factor * statistics.median(value for _, value in self._recent)
