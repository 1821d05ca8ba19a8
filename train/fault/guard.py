"""The numerical guard: a step whose loss or gradients are not finite changes nothing.

Without an fp16 loss scaler (fp32 and bf16 runs) megatron-core steps the optimizer on whatever gradients it is
given, so a single NaN batch poisons every weight and Adam moment, and every checkpoint after it. Before the update
each rank states whether its gradients are finite; the flags travel in the all-reduce that already sums the step's
losses (``mimo.train.step``), so every rank sees the same loss and the same flags and decides alike.

A skipped step leaves unchanged: the weights, the Adam moments and step counts (the optimizer is not called), the
aux-loss-free expert biases (megatron updates them inside ``finalize_model_grads``, before the update could be
refused, so they are snapshotted before the step and restored) and the schedule position (consumed tokens: the
learning rate and batch ramp follow the tokens actually trained on, as megatron's scheduler follows successful
updates). It advances the step counter and the data position: the batch is skipped, not retried, since a batch
that made the loss non-finite would do so again, and the sample order stays a function of the data position.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mimo.train.checkpoint.health import all_finite
from mimo.train.checkpoint.storage import unwrapped


def local_gradients_finite(model_chunks: Sequence[torch.nn.Module]) -> bool:
    """Whether this rank's reduced gradients are all finite: one pass over megatron's contiguous gradient buffers
    (dense and expert), which hold every trainable parameter's gradient."""
    return all_finite(
        buffer.grad_data for chunk in model_chunks for buffer in (*chunk.buffers, *chunk.expert_parallel_buffers)
    )


class ExpertBiasSnapshot:
    """The routers' expert biases as they were before a step, to be put back if the step is skipped."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module]) -> None:
        self._biases = [
            module.expert_bias
            for chunk in model_chunks
            for module in unwrapped(chunk).modules()
            if getattr(module, "expert_bias", None) is not None
        ]
        self._saved = [bias.detach().clone() for bias in self._biases]

    def restore(self) -> None:
        with torch.no_grad():
            for bias, saved in zip(self._biases, self._saved):
                bias.copy_(saved)


@dataclass(frozen=True)
class NonFinite:
    """What was not finite in a step, for the warning and the stop message."""

    loss: bool
    gradient_ranks: tuple[int, ...]

    @classmethod
    def of(cls, loss: float, gradient_ranks: tuple[int, ...]) -> "NonFinite | None":
        """None when the step's (all-reduced) loss and every rank's gradients are finite."""
        if math.isfinite(loss) and not gradient_ranks:
            return None
        return cls(not math.isfinite(loss), gradient_ranks)

    def describe(self) -> str:
        parts = ["the loss"] if self.loss else []
        if self.gradient_ranks:
            ranks = ", ".join(str(rank) for rank in self.gradient_ranks)
            parts.append(f"the gradients on rank{'s' if len(self.gradient_ranks) > 1 else ''} {ranks}")
        return " and ".join(parts) + " not finite"
