"""The exchanges that bring back the parts of a sequence a context-parallel rank needs.

Each rank holds two of the sequence's 2 * cp chunks (``mimo.parallel.sequence_chunks``). Global attention needs
the keys and values of all of them (``gather_in_sequence_order``, also used by evaluation for the whole sequence's
logits), sliding-window attention only the ``window`` tokens before each chunk (``halo_exchange``), and loss
normalisation the token count of the whole sequence.
"""

from collections import Counter

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.utils import get_pg_rank, get_pg_size

from mimo.parallel.config import ALLGATHER, HALO
from mimo.parallel.sequence_chunks import HaloPiece, chunk_owner, halo_pieces, load_balanced_chunks

SENT_BYTES: Counter = Counter()
"""Bytes this process has sent to other context-parallel ranks, by (exchange, "forward" | "backward"): the halo's
point-to-point messages exactly; an all-gather of a tensor as (cp - 1) times its bytes, what every rank sends in a
ring all-gather and in the reduce-scatter of its backward. ``bench/bench_cp.py`` reads it."""


def sum_over_context_parallel(value: torch.Tensor, cp_group: torch.distributed.ProcessGroup) -> torch.Tensor:
    """``value`` summed over the context-parallel ranks (e.g. a token count of the whole sequence), detached:
    normalisers carry no gradient."""
    total = value.detach().clone()
    if get_pg_size(cp_group) > 1:
        torch.distributed.all_reduce(total, group=cp_group)
    return total


def sequence_positions(local_length: int, cp_group: torch.distributed.ProcessGroup, device) -> torch.Tensor:
    """[local_length] positions in the whole sequence of this rank's tokens (its two chunks, in its order)."""
    cp = get_pg_size(cp_group)
    if cp == 1:
        return torch.arange(local_length, device=device)
    chunk = local_length // 2
    chunk_ids = load_balanced_chunks(get_pg_rank(cp_group), cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in chunk_ids])


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
    SENT_BYTES[ALLGATHER, "forward"] += (cp - 1) * along_first.nbytes
    if gathered.requires_grad:
        gathered.register_hook(_count_reduce_scatter((cp - 1) * along_first.nbytes))
    pieces = gathered.chunk(2 * cp, dim=0)  # rank after rank, each rank's two chunks in its order
    ordered: list[torch.Tensor | None] = [None] * (2 * cp)
    for rank in range(cp):
        for piece, chunk_id in zip(pieces[2 * rank : 2 * rank + 2], load_balanced_chunks(rank, cp)):
            ordered[chunk_id] = piece
    whole = torch.cat(ordered, dim=0)
    return whole.transpose(0, dim) if dim else whole


def _count_reduce_scatter(nbytes: int):
    def count(grad: torch.Tensor) -> None:
        SENT_BYTES[ALLGATHER, "backward"] += nbytes

    return count


def halo_exchange(
    local: torch.Tensor, window: int, cp_group: torch.distributed.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of this rank's two chunks (``local``: both along dim 0, in ``load_balanced_chunks`` order) the up to
    ``window`` tokens before it, in sequence order: received point to point from the ranks holding them, copied
    where this rank holds them. The first chunk of the sequence gets none.

    Differentiable: the backward sends each halo's gradient back to the rank whose tokens it is, which adds it to
    theirs. Each rank sends and receives O(window) tokens per chunk, against O(seq) for an all-gather.
    """
    return _HaloExchange.apply(local, window, cp_group)


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, window: int, cp_group: torch.distributed.ProcessGroup):
        cp, rank = get_pg_size(cp_group), get_pg_rank(cp_group)
        chunk = local.shape[0] // 2
        pieces = halo_pieces(cp, chunk, window)
        mine = load_balanced_chunks(rank, cp)
        tails = {i: _tail(local, mine, chunk, piece) for i, piece in enumerate(pieces) if piece.source in mine}
        arrived = _route(pieces, cp_group, tails, local, backward=False)
        ctx.pieces, ctx.cp_group, ctx.chunk, ctx.local_shape = pieces, cp_group, chunk, local.shape
        empty = local.new_empty((0, *local.shape[1:]))
        return tuple(
            torch.cat([arrived[i] for i, piece in enumerate(pieces) if piece.target == target] or [empty])
            for target in mine
        )

    @staticmethod
    def backward(ctx, *grad_halos: torch.Tensor):
        pieces, cp_group, chunk = ctx.pieces, ctx.cp_group, ctx.chunk
        mine = load_balanced_chunks(get_pg_rank(cp_group), get_pg_size(cp_group))
        outgoing = {}
        for target, grad in zip(mine, grad_halos):
            indices = [i for i, piece in enumerate(pieces) if piece.target == target]
            outgoing.update(zip(indices, grad.split([pieces[i].length for i in indices])))
        grad_local = grad_halos[0].new_zeros(ctx.local_shape)
        for index, grad in _route(pieces, cp_group, outgoing, grad_local, backward=True).items():
            _tail(grad_local, mine, chunk, pieces[index]).add_(grad)
        return grad_local, None, None


def _tail(local: torch.Tensor, mine: tuple[int, int], chunk: int, piece: HaloPiece) -> torch.Tensor:
    """The tokens of ``piece`` in this rank's ``local`` [2 * chunk, ...] (a view)."""
    end = (mine.index(piece.source) + 1) * chunk
    return local[end - piece.length : end]


def _route(
    pieces: list[HaloPiece],
    cp_group: torch.distributed.ProcessGroup,
    outgoing: dict[int, torch.Tensor],
    like: torch.Tensor,
    backward: bool,
) -> dict[int, torch.Tensor]:
    """Move each piece from the rank holding its source chunk to the rank holding its target (the reverse in the
    backward): ``outgoing`` holds this rank's pieces by index; returns those arriving here by index (``like``
    gives their dtype, device and trailing shape). One batch of point-to-point operations, posted in the same
    piece order on every rank, so several messages between two ranks pair up."""
    cp, rank = get_pg_size(cp_group), get_pg_rank(cp_group)
    arrived: dict[int, torch.Tensor] = {}
    operations, sent = [], 0
    for index, piece in enumerate(pieces):
        sender, receiver = chunk_owner(piece.source, cp), chunk_owner(piece.target, cp)
        if backward:
            sender, receiver = receiver, sender
        if sender == rank == receiver:
            arrived[index] = outgoing[index]
        elif sender == rank:
            tensor = outgoing[index].contiguous()
            sent += tensor.nbytes
            operations.append(dist.P2POp(dist.isend, tensor, group=cp_group, group_peer=receiver, tag=index))
        elif receiver == rank:
            arrived[index] = like.new_empty((piece.length, *like.shape[1:]))
            operations.append(dist.P2POp(dist.irecv, arrived[index], group=cp_group, group_peer=sender, tag=index))
    if operations:
        for work in dist.batch_isend_irecv(operations):
            work.wait()
    SENT_BYTES[HALO, "backward" if backward else "forward"] += sent
    return arrived
