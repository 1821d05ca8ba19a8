"""The local core attention's split at SHORT_ATTENTION_SCORES: calls whose score matrix fits run dense (torch's
SDPA, the blocked window product), longer ones the tiled kernel. Both sides of the boundary must equal the dense
FP64 reference, and only the short side may hold a tensor of batch x heads x seq x seq elements."""

import pytest
import torch
from test_model_attention import HEADS, LargestTensor, dense_reference, random_qkv

from mimo.model.config import SHORT_ATTENTION_SCORES
from mimo.model.core_attention import causal_attention, sliding_window_attention

SHORT_SEQ, LONG_SEQ = 640, 768
"""With one sequence of HEADS heads: 4 x 640^2 scores fit SHORT_ATTENTION_SCORES, 4 x 768^2 do not."""
WINDOW, PAST = 48, 32


def attend(kind: str, seq: int, with_sink: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The last ``seq - PAST`` queries after ``PAST`` keys (a context-parallel chunk's call), the reference's rows
    and the largest tensor any op produced."""
    query, key, value, sink = random_qkv(seq, batch=1)
    sink = sink if with_sink else None
    window = WINDOW if kind == "sliding" else None
    expected = dense_reference(query, key, value, window=window, scale=0.3, sink=sink)[:, :, PAST:]
    tail = query[:, :, PAST:]
    with LargestTensor() as mode:
        if window is None:
            actual = causal_attention(tail, key, value, scale=0.3, sink=sink, past=PAST)
        else:
            actual = sliding_window_attention(tail, key, value, window=window, scale=0.3, sink=sink, past=PAST)
    return actual, expected, mode.largest


def test_the_sizes_straddle_the_boundary():
    assert HEADS * SHORT_SEQ * SHORT_SEQ <= SHORT_ATTENTION_SCORES < HEADS * (LONG_SEQ - PAST) * LONG_SEQ


@pytest.mark.parametrize("kind, with_sink", [("global", False), ("global", True), ("sliding", True)])
@pytest.mark.parametrize("seq", [SHORT_SEQ, LONG_SEQ])
def test_both_sides_equal_the_dense_reference(kind, with_sink, seq):
    actual, expected, largest = attend(kind, seq, with_sink)
    assert torch.allclose(actual, expected, atol=1e-10, rtol=0)
    if seq == LONG_SEQ:
        assert largest < HEADS * (seq - PAST) * seq  # the tiled kernel: no seq x seq matrix
    elif kind == "global":
        assert largest >= HEADS * (seq - PAST) * seq  # dense: the whole score matrix at once
