"""Checkpoints written in the background (``checkpoint.async_save``): megatron-core's async dist-checkpointing with
its persistent worker process, which stays up for the whole run so a save does not pay a process start.

A save stages this rank's tensors (a GPU copies them to host memory; on CPU the worker copies them, see
``checkpoint_worker_cpu`` in ``mimo.parallel.megatron_patches.device``) while training waits, then training goes on
while the worker writes. The training loop polls after every step; once every rank's write has finished, the
request's finalize functions run on every rank: megatron's (the shard index) and then mimo's (rename the partial
directory, move ``latest``). Until then the previous ``latest`` stays, so a kill mid-write loses nothing.

Every call here is collective: all ranks call it at the same point of the loop.
"""

import logging

from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest
from torch.distributed.checkpoint.api import CheckpointException

from mimo.train.checkpoint import CheckpointError

logger = logging.getLogger("mimo")


class BackgroundWriter:
    def __init__(self) -> None:
        self._queue = AsyncCallsQueue(persistent=True)
        self._what = ""

    @property
    def busy(self) -> bool:
        return self._queue.get_num_unfinalized_calls() > 0

    def schedule(self, request: AsyncRequest, what: str) -> None:
        """Start writing ``what`` (a checkpoint directory, for messages); waits for the previous write first."""
        self.wait()
        self._what = what
        self._queue.schedule_async_request(request)

    def poll(self) -> None:
        """Complete the write in flight if every rank has finished it; never waits for the write itself."""
        if self.busy:
            self._finalize(blocking=False)

    def wait(self) -> None:
        """Block until the write in flight (if any) is complete on every rank and finalized."""
        if self.busy:
            logger.info("waiting for the background checkpoint write of %s", self._what)
            self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        try:
            self._queue.maybe_finalize_async_calls(blocking=blocking)
        except (CheckpointingException, CheckpointException) as err:  # megatron's and torch's
            raise CheckpointError(
                f"the background write of checkpoint {self._what} failed: {err}; `latest` still names the previous"
                " checkpoint (check the disk, then resume)"
            ) from err

    def close(self) -> None:
        """Finish the write in flight, then stop the worker process."""
        try:
            self.wait()
        finally:
            self._queue.close()
