"""A checkpoint is written only from finite numbers.

Each rank checks what it would write (its model chunks' parameters and buffers, the expert biases among them, and
its optimizer's main parameters and Adam moments) in one pass, and one all-reduce makes every rank agree, so all
ranks save or all refuse. The pass reads the state once, which costs a small fraction of writing it.
"""

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core.optimizer import MegatronOptimizer

from mimo.train.checkpoint.storage import unwrapped


def _saved_tensors(model_chunks: Sequence[torch.nn.Module], optimizer: MegatronOptimizer | None) -> Iterator:
    for chunk in model_chunks:
        module = unwrapped(chunk)
        yield from module.parameters()
        yield from module.buffers()
    if optimizer is None:
        return
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)  # a stub optimizer (nothing on this rank) has none
        if inner is None:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                yield param
                yield from (value for value in inner.state.get(param, {}).values() if torch.is_tensor(value))


def state_is_finite(
    model_chunks: Sequence[torch.nn.Module], optimizer: MegatronOptimizer | None, device: torch.device
) -> bool:
    """True on every rank when no rank holds a NaN or an infinity in what a checkpoint would hold."""
    flags = [torch.isfinite(tensor).all() for tensor in _saved_tensors(model_chunks, optimizer) if tensor.numel()]
    local_ok = bool(torch.stack(flags).all()) if flags else True
    bad = torch.tensor([0.0 if local_ok else 1.0], device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0
