"""Document masking of packed sequences (``data.reset_attention_mask``): which token belongs to which document, as
every layer's attention receives it.

A micro-batch carries ``document_ids`` [b, s] (``mimo.data.documents``), for the whole sequence whatever the
context parallelism; ids ascend along a row, one per document. The model passes
them down in megatron's ``attention_mask`` argument, which GPTModel hands to every decoder and MTP layer: mimo's
compact form of the [b, 1, s, s] mask megatron's dataset would build (O(s) instead of O(s^2) per sample). Because
every rank holds the ids of the whole sequence, context parallelism needs no exchange of them: a chunk cuts out the
ids of its queries and of the keys it receives.

Backends: mimo's tiled kernel applies the ids directly (``mimo.model.attention_kernel``); Transformer Engine takes
packed documents in its THD format, one cumulative-length vector (``thd_packed_seq_params``).
"""

import torch
from megatron.core.packed_seq_params import PackedSeqParams

THD_FORMAT = "thd"


def thd_packed_seq_params(documents: torch.Tensor) -> PackedSeqParams:
    """Transformer Engine's THD description of the rows of ``documents`` [b, s] laid end to end (row-major, as
    [s, b] activations become after ``.transpose(0, 1).flatten(0, 1)``): one sequence per document of each row.
    Reads the longest document's length back to the host (TE needs it as an int)."""
    batch, seq = documents.shape
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    offsets = starts.flatten().nonzero().flatten().to(torch.int32)
    cu_seqlens = torch.cat([offsets, offsets.new_tensor([batch * seq])])
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(
        qkv_format=THD_FORMAT,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def same_document_ahead(documents: torch.Tensor, positions: torch.Tensor, ahead: int) -> torch.Tensor:
    """[b, n] booleans: whether the token ``ahead`` positions after each of ``positions`` ([b, n] or [n], indices
    into the whole sequence) is in the same document (False past the sequence's end)."""
    positions = positions.expand(documents.shape[0], -1)
    later = positions + ahead
    inside = later < documents.shape[1]
    ahead_ids = documents.gather(1, later.clamp(max=documents.shape[1] - 1))
    return inside & (ahead_ids == documents.gather(1, positions))
