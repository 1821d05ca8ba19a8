"""How a sequence lies across context-parallel ranks, for the code that needs all of it back.

megatron's load-balanced split (``megatron.core.utils.get_batch_on_this_cp_rank``, applied to every batch by the
training step) cuts each sequence into 2 * cp equal chunks and gives rank r chunks r and 2 * cp - 1 - r, so that
under causal attention every rank has the same work. Attention needs the keys and values of all of them, and
evaluation the whole sequence's logits, and loss normalisation the token count of the whole sequence.
"""

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.utils import get_pg_size


def load_balanced_chunks(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two of the sequence's 2 * cp_size chunks that context-parallel rank ``cp_rank`` holds, in its order."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def sum_over_context_parallel(value: torch.Tensor, cp_group: torch.distributed.ProcessGroup) -> torch.Tensor:
    """``value`` summed over the context-parallel ranks (e.g. a token count of the whole sequence), detached:
    normalisers carry no gradient."""
    total = value.detach().clone()
    if get_pg_size(cp_group) > 1:
        torch.distributed.all_reduce(total, group=cp_group)
    return total


def gather_in_sequence_order(
    local: torch.Tensor, cp_group: torch.distributed.ProcessGroup, dim: int = 0
) -> torch.Tensor:
    """Every rank's part of a tensor split along ``dim`` as one tensor in sequence order.

    Differentiable: the backward reduce-scatters, summing the gradients all ranks computed for each position
    (e.g. of keys that other ranks' queries attended to) and handing each rank those of its own positions.
    """
    cp = get_pg_size(cp_group)
    if cp == 1:
        return local
    along_first = local.transpose(0, dim) if dim else local
    gathered = gather_from_sequence_parallel_region(
        along_first.contiguous(), tensor_parallel_output_grad=True, group=cp_group
    )
    pieces = gathered.chunk(2 * cp, dim=0)  # rank after rank, each rank's two chunks in its order
    ordered: list[torch.Tensor | None] = [None] * (2 * cp)
    for rank in range(cp):
        for piece, chunk_id in zip(pieces[2 * rank : 2 * rank + 2], load_balanced_chunks(rank, cp)):
            ordered[chunk_id] = piece
    whole = torch.cat(ordered, dim=0)
    return whole.transpose(0, dim) if dim else whole
