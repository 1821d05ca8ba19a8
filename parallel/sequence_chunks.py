"""Which chunks of a sequence each context-parallel rank holds, and which tokens of other chunks a sliding window
needs: plain arithmetic, shared by the exchange itself (``mimo.parallel.context_parallel``) and the planner
(``mimo.train.tools.plan``), which must not import torch.

megatron's load-balanced split (``megatron.core.utils.get_batch_on_this_cp_rank``) cuts each sequence into
2 * cp equal chunks and gives rank r chunks r and 2 * cp - 1 - r, so that under causal attention every rank has
the same work.
"""

import math
from dataclasses import dataclass


def load_balanced_chunks(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two of the sequence's 2 * cp_size chunks that context-parallel rank ``cp_rank`` holds, in its order."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def chunk_owner(chunk: int, cp_size: int) -> int:
    """The context-parallel rank holding chunk ``chunk`` of the 2 * cp_size (``load_balanced_chunks``)."""
    return chunk if chunk < cp_size else 2 * cp_size - 1 - chunk


@dataclass(frozen=True)
class HaloPiece:
    """The last ``length`` tokens of chunk ``source``, which chunk ``target``'s queries see."""

    source: int
    target: int
    length: int


def halo_pieces(cp_size: int, chunk: int, window: int) -> list[HaloPiece]:
    """What each chunk needs of the chunks before it: the ``window`` tokens before chunk j (fewer near the start)
    are the tail of chunk j - 1 and, when chunks are shorter than the window, all of j - 1 and the tail of j - 2,
    and so on. Targets ascending, each target's sources ascending: every rank lists the pieces in the same order,
    and a target's pieces concatenate in sequence order."""
    pieces = []
    for target in range(1, 2 * cp_size):
        need = min(window, target * chunk)
        for source in range(target - math.ceil(need / chunk), target):
            pieces.append(HaloPiece(source, target, min(chunk, need - (target - 1 - source) * chunk)))
    return pieces


def halo_tokens_sent(cp_size: int, chunk: int, window: int, cp_rank: int, backward: bool = False) -> int:
    """Tokens of one sequence that rank ``cp_rank`` sends to other ranks in one pass of the halo exchange: in the
    forward the pieces of its chunks that another rank's chunks see, in the backward the gradients of the pieces
    it received from other ranks."""
    sent = 0
    for piece in halo_pieces(cp_size, chunk, window):
        sender, receiver = chunk_owner(piece.source, cp_size), chunk_owner(piece.target, cp_size)
        if backward:
            sender, receiver = receiver, sender
        if sender == cp_rank != receiver:
            sent += piece.length
    return sent
