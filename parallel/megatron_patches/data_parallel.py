"""Patches to megatron-core's data-parallel gradient and parameter buffers (see ``mimo.parallel.megatron_patches``)."""

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from mimo.parallel.megatron_patches import Patch


def _in_place_on_one_rank(output: torch.Tensor, input_: torch.Tensor, group: Any, async_op: bool) -> bool:
    """A synchronous collective over a group of one rank whose output is its input: it has nothing to do."""
    return (
        not async_op
        and dist.get_world_size(group) == 1
        and output.data_ptr() == input_.data_ptr()
        and output.numel() == input_.numel()
    )


def _skipping_one_rank(collective: Callable) -> Callable:
    """``collective(output, input, ..., group=, async_op=)``, returning at once where it would copy a buffer onto
    itself."""

    @functools.wraps(collective)
    def run(output: torch.Tensor, input_: torch.Tensor, *args: Any, group: Any = None, async_op: bool = False, **kw):
        if _in_place_on_one_rank(output, input_, group, async_op):
            return None
        return collective(output, input_, *args, group=group, async_op=async_op, **kw)

    return run


def _skip_one_rank_buffer_collectives() -> None:
    """Every step, megatron's DDP reduce-scatters each gradient buffer over the data-parallel group and its
    distributed optimizer all-gathers each parameter buffer back; over a group of one rank each buffer is its own
    shard and both are no-ops. gloo still runs them, copying every buffer through its worker thread (about 10 ms
    per step for the tiny model, 4% of the step)."""
    from megatron.core.distributed import param_and_grad_buffer as buffers

    buffers.dist_all_gather_func = _skipping_one_rank(buffers.dist_all_gather_func)
    buffers.dist_reduce_scatter_func = _skipping_one_rank(buffers.dist_reduce_scatter_func)


PATCHES = (
    Patch(
        "one_rank_buffer_collectives",
        "no_cuda",
        "a reduce-scatter or all-gather of a buffer onto itself over one rank costs nothing",
        _skip_one_rank_buffer_collectives,
    ),
)
