"""The local core attention: exact against a dense masked reference, and O(seq * window) in memory."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mimo.model.core_attention import causal_attention, sliding_window_attention

HEADS, GROUPS, QK_DIM, V_DIM = 4, 2, 12, 8


def dense_reference(query, key, value, *, window, scale, sink):
    """softmax over a full [s, s] score matrix with the causal (and window) mask and the sink column."""
    seq = query.shape[2]
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    scores = query @ key.transpose(-1, -2) * scale
    row, col = torch.arange(seq).unsqueeze(1), torch.arange(seq).unsqueeze(0)
    visible = col <= row if window is None else (col <= row) & (col >= row - window)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sink is not None:
        scores = torch.cat([scores, sink.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], dim=-1)
    probs = scores.softmax(-1)
    if sink is not None:
        probs = probs[..., :-1]
    return probs @ value


def random_qkv(seq, batch=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, HEADS, seq, QK_DIM, generator=gen, dtype=dtype),
        torch.randn(batch, GROUPS, seq, QK_DIM, generator=gen, dtype=dtype),
        torch.randn(batch, GROUPS, seq, V_DIM, generator=gen, dtype=dtype),
        torch.randn(HEADS, generator=gen, dtype=dtype) * 2,
    )


@pytest.mark.parametrize("seq, window", [(1, 4), (7, 4), (16, 4), (17, 4), (33, 1), (12, 0), (10, 30), (64, 16)])
@pytest.mark.parametrize("with_sink", [False, True])
def test_sliding_window_equals_dense_masked_reference(seq, window, with_sink):
    query, key, value, sink = random_qkv(seq)
    sink = sink if with_sink else None
    actual = sliding_window_attention(query, key, value, window=window, scale=0.3, sink=sink)
    expected = dense_reference(query, key, value, window=window, scale=0.3, sink=sink)
    assert torch.allclose(actual, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("with_sink", [False, True])
def test_causal_attention_equals_dense_masked_reference(with_sink):
    query, key, value, sink = random_qkv(23)
    sink = sink if with_sink else None
    actual = causal_attention(query, key, value, scale=0.3, sink=sink)
    assert torch.allclose(actual, dense_reference(query, key, value, window=None, scale=0.3, sink=sink), atol=1e-10)


@pytest.mark.parametrize("past, seq, window", [(4, 8, 4), (3, 8, 4), (0, 8, 4), (16, 16, 16), (5, 3, 8), (7, 9, 30)])
@pytest.mark.parametrize("with_sink", [False, True])
def test_queries_after_past_keys_equal_the_tail_of_the_whole_sequence(past, seq, window, with_sink):
    """A context-parallel chunk: its queries see ``past`` earlier keys; the rows must equal the whole sequence's."""
    query, key, value, sink = random_qkv(past + seq)
    sink = sink if with_sink else None
    tail = query[:, :, past:]
    expected = dense_reference(query, key, value, window=window, scale=0.3, sink=sink)[:, :, past:]
    if past <= window:
        actual = sliding_window_attention(tail, key, value, window=window, scale=0.3, sink=sink, past=past)
        assert torch.allclose(actual, expected, atol=1e-10, rtol=0)
    causal = dense_reference(query, key, value, window=None, scale=0.3, sink=sink)[:, :, past:]
    assert torch.allclose(causal_attention(tail, key, value, scale=0.3, sink=sink, past=past), causal, atol=1e-10)


def test_more_past_keys_than_the_window_are_refused():
    query, key, value, _ = random_qkv(10)
    with pytest.raises(ValueError, match="0 <= past <= window"):
        sliding_window_attention(query[:, :, 5:], key, value, window=4, scale=0.3, past=5)


def test_sink_takes_probability_mass_and_gets_gradients():
    query, key, value, sink = random_qkv(20, dtype=torch.float32)
    sink.requires_grad_(True)
    ones = torch.ones_like(value)
    # With all-ones values the output is the total weight on real keys: below one exactly because of the sink.
    out = sliding_window_attention(query, key, ones, window=4, scale=0.3, sink=sink)
    assert (out < 1).all()
    out.sum().backward()
    assert sink.grad is not None and (sink.grad != 0).all()


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def largest_intermediate(seq, window, backward):
    query, key, value, sink = (t.float().requires_grad_(backward) for t in random_qkv(seq, batch=1))
    with LargestTensor() as mode:
        out = sliding_window_attention(query, key, value, window=window, scale=0.3, sink=sink)
        if backward:
            out.sum().backward()
    return mode.largest


@pytest.mark.parametrize("backward", [False, True])
def test_sliding_window_memory_is_linear_in_sequence_length(backward):
    window = 16
    short, long = largest_intermediate(512, window, backward), largest_intermediate(2048, window, backward)
    # 4x the sequence gives 4x the largest tensor (scores: heads * seq * (2 * window + 1)), never seq^2.
    assert long <= 4 * short * 1.05
    assert long <= HEADS * 2048 * (2 * window + 1)
    assert long < HEADS * 2048 * 2048 / 10
