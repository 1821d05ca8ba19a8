"""A testing hook that injects real faults into a real run, so the tests of the numerical guard, the spike
policies and the hang watchdog exercise the production code on genuinely corrupted batches and gradients rather
than on patched results.

Set ``MIMO_FAULT_INJECTION`` to a comma-separated list of ``KIND@STEP`` or ``KIND@STEP:RANK`` (STEP counts from 1,
RANK is the global rank; without it every rank is hit):

* ``nan_grad@4:1``: after step 4's backward, rank 1's first gradient value becomes NaN;
* ``nan_loss@4``: step 4's first micro-batch gets a NaN loss mask, so its loss and every gradient are NaN;
* ``spike@9``: step 9 trains on labels that are all the last token id of the vocabulary, which no document of
  the shipped corpus contains, so the loss jumps to several times its running median;
* ``hang@3:1``: rank 1 sleeps for an hour at the start of step 3.

Each fault fires once per process: a rollback that replays a step number does not meet it again. It is a hook
for ``tests/``; nothing reads it unless the variable is set.
"""

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger("mimo")

ENV_VAR = "MIMO_FAULT_INJECTION"
KINDS = ("nan_grad", "nan_loss", "spike", "hang")
HANG_SECONDS = 3600.0


class InjectionSpecError(ValueError):
    """A malformed MIMO_FAULT_INJECTION (a test bug, not a user error)."""


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None
    """None: every rank."""


def parse_faults(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            kind, _, where = item.partition("@")
            step, _, rank = where.partition(":")
            fault = Fault(kind, int(step), int(rank) if rank else None)
        except ValueError as err:
            raise InjectionSpecError(f"{ENV_VAR}: cannot read {item!r}; write KIND@STEP or KIND@STEP:RANK") from err
        if fault.kind not in KINDS:
            raise InjectionSpecError(f"{ENV_VAR}: unknown fault {fault.kind!r}; one of {', '.join(KINDS)}")
        faults.append(fault)
    return faults


class FaultInjector:
    """The faults meant for this rank, fired at their step."""

    def __init__(self, faults: Sequence[Fault], rank: int, vocab_size: int) -> None:
        self._pending = [fault for fault in faults if fault.rank in (None, rank)]
        self.rank = rank
        self.vocab_size = vocab_size
        self.step = 0
        self._corrupt_labels = False

    @classmethod
    def from_environment(cls, rank: int, vocab_size: int) -> "FaultInjector":
        return cls(parse_faults(os.environ.get(ENV_VAR, "")), rank, vocab_size)

    def _fire(self, kind: str) -> bool:
        for fault in self._pending:
            if fault.kind == kind and fault.step == self.step:
                self._pending.remove(fault)
                logger.warning("fault injection (%s): %s at step %d on rank %d", ENV_VAR, kind, self.step, self.rank)
                return True
        return False

    def begin_step(self, step: int) -> None:
        self.step = step
        self._corrupt_labels = False
        if self._fire("hang"):
            time.sleep(HANG_SECONDS)

    def corrupt_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Called with every micro-batch before it reaches the model."""
        if self._fire("nan_loss"):
            batch = {**batch, "loss_mask": torch.full_like(batch["loss_mask"], float("nan"))}
        self._corrupt_labels = self._corrupt_labels or self._fire("spike")
        if self._corrupt_labels:  # every micro-batch of the step
            batch = {**batch, "labels": torch.full_like(batch["labels"], self.vocab_size - 1)}
        return batch

    def corrupt_gradients(self, model_chunks: Sequence[torch.nn.Module]) -> None:
        """Called after the backward pass (gradients reduced over data-parallel ranks), before the guard."""
        if self._fire("nan_grad"):
            model_chunks[0].buffers[0].grad_data.view(-1)[0] = float("nan")
