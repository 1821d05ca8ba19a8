"""Where a rollback returns to, and where the data continues from.

``fault.spike_policy=rollback`` reloads the newest complete checkpoint saved before the spike whose recorded
losses (``CheckpointMeta.losses``, the spike detector's window at save time) end below the spike's limit, so that
a loss that crept up over several steps before crossing the limit is not returned to. The data does not replay:
training continues after the spike's batch and ``fault.rollback_skip_batches`` more, so every batch from the
checkpoint through the spike is skipped, as large runs have done (PaLM restarted about 100 steps before a spike
and skipped 200 to 500 batches).
"""

import logging
from collections import Counter
from pathlib import Path

from mimo.train.checkpoint import CheckpointError
from mimo.train.checkpoint.manager import complete_checkpoints, read_meta
from mimo.train.fault import FaultStop
from mimo.train.fault.spikes import Spike
from mimo.train.records import CheckpointMeta

logger = logging.getLogger("mimo")

ROLLBACKS_PER_CHECKPOINT = 3
"""Returning to the same checkpoint more often than this means the spikes do not come from the data: stop."""


def rollback_target(root: Path, spike: Spike) -> tuple[Path, CheckpointMeta] | None:
    """The newest checkpoint under ``root`` saved before the spike whose last recorded loss was below its limit."""
    for path in reversed(complete_checkpoints(root)):
        try:
            meta = read_meta(path)
        except CheckpointError as err:
            logger.warning("rollback: skipping %s: %s", path, err)
            continue
        if meta.state.step < spike.step and (not meta.losses or meta.losses[-1][1] <= spike.limit):
            return path, meta
    return None


class Rollbacks:
    """The rollbacks of one run, bounded per checkpoint."""

    def __init__(self, root: Path, skip_batches: int) -> None:
        self.root = root
        self.skip_batches = skip_batches
        self._count: Counter[str] = Counter()

    def plan(self, spike: Spike) -> tuple[Path, CheckpointMeta] | None:
        """Where to return to after ``spike`` (None: no checkpoint before it), or FaultStop when spikes keep
        coming back after returning to the same checkpoint."""
        target = rollback_target(self.root, spike)
        if target is None:
            return None
        self._count[target[0].name] += 1
        if self._count[target[0].name] > ROLLBACKS_PER_CHECKPOINT:
            raise FaultStop(
                f"{spike.describe()}: this run already rolled back to {target[0]} {ROLLBACKS_PER_CHECKPOINT} times"
                " and the spikes keep coming, so they do not come from the skipped data; lower optim.lr, or look at"
                " the model (fault.spike_policy=stop keeps the state at the spike)"
            )
        return target

    def data_position(self, spike_end_samples: int, global_batch_size: int) -> int:
        """Where the data continues after a rollback: after the spike's batch (which ended at
        ``spike_end_samples``) and ``fault.rollback_skip_batches`` more batches of the spike step's size."""
        return spike_end_samples + self.skip_batches * global_batch_size
