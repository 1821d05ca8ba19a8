"""Whether numbers are finite, cheaply: for the checkpoint health check (a checkpoint is written only from finite
numbers) and for the numerical guard's gradient check (``mimo.train.fault.guard``).

Before a save each rank checks what it would write (its model chunks' parameters and buffers, the expert biases
among them, and its optimizer's main parameters and Adam moments), and one all-reduce makes every rank agree, so
all ranks save or all refuse.
"""

from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core.optimizer import MegatronOptimizer

from mimo.train.checkpoint.storage import unwrapped


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether no tensor holds a NaN or an infinity.

    A sum reads a tensor once and turns any NaN or infinity into a non-finite total, many times faster than an
    element-wise test; only a tensor whose total is not finite (finite values can also overflow a sum) is then
    tested element by element. One synchronisation in the common case.
    """
    floating = [tensor for tensor in tensors if tensor.is_floating_point() and tensor.numel()]
    if not floating:
        return True
    totals = torch.stack([tensor.sum().float() for tensor in floating])
    suspects = (~torch.isfinite(totals)).nonzero().flatten().tolist()
    return all(bool(torch.isfinite(floating[index]).all()) for index in suspects)


def _saved_tensors(model_chunks: Sequence[torch.nn.Module], optimizer: MegatronOptimizer | None) -> Iterator:
    weights = set()
    for chunk in model_chunks:
        module = unwrapped(chunk)
        for param in module.parameters():
            weights.add(param.untyped_storage().data_ptr())
            yield param
        yield from module.buffers()
    if optimizer is None:
        return
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)  # a stub optimizer (nothing on this rank) has none
        if inner is None:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                if param.untyped_storage().data_ptr() not in weights:  # FP32 main parameters view the weights
                    yield param
                yield from (value for value in inner.state.get(param, {}).values() if torch.is_tensor(value))


def state_is_finite(
    model_chunks: Sequence[torch.nn.Module], optimizer: MegatronOptimizer | None, device: torch.device
) -> bool:
    """True on every rank when no rank holds a NaN or an infinity in what a checkpoint would hold."""
    bad = torch.tensor([0.0 if all_finite(_saved_tensors(model_chunks, optimizer)) else 1.0], device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0
