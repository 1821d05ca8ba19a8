"""mimo's tiled attention kernel against a dense FP64 reference: outputs and the gradients of queries, keys,
values and sink, on global and sliding-window layers, with past keys (context parallelism), grouped KV heads, and
tilings from one tile to many tiny ones; and what it allocates and keeps."""

import pytest
import torch
from test_model_attention import LargestTensor

import mimo.model.attention_kernel as kernel
from mimo.model.attention_kernel import attention

HEADS, QK_DIM, V_DIM, SCALE = 4, 12, 8, 0.3


def dense_reference(query, key, value, *, window, sink, past):
    """softmax over the full [s, past + s] score matrix: query i at key position past + i sees keys
    past + i - window .. past + i (all earlier ones without a window); the sink is one more logit column with no
    value, dropped after the softmax."""
    seq = query.shape[2]
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    scores = query @ key.transpose(-1, -2) * SCALE
    query_pos = torch.arange(seq).unsqueeze(1) + past
    key_pos = torch.arange(past + seq).unsqueeze(0)
    visible = key_pos <= query_pos
    if window is not None:
        visible &= key_pos >= query_pos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    if sink is not None:
        scores = torch.cat([scores, sink.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], dim=-1)
    probs = scores.softmax(-1)
    if sink is not None:
        probs = probs[..., :-1]
    return probs @ value


def random_inputs(seq, past, groups, with_sink, batch=2, dtype=torch.float64, seed=0):
    """q, k, v laid out as mimo hands them over ([s, b, heads, d] memory seen as [b, heads, s, d]), and a sink."""
    gen = torch.Generator().manual_seed(seed)

    def sequence_first(length, heads, dim):
        return torch.randn(length, batch, heads, dim, generator=gen, dtype=dtype).permute(1, 2, 0, 3)

    query = sequence_first(seq, HEADS, QK_DIM)
    key, value = sequence_first(past + seq, groups, QK_DIM), sequence_first(past + seq, groups, V_DIM)
    sink = torch.randn(HEADS, generator=gen, dtype=dtype) * 2 if with_sink else None
    return [t.requires_grad_() for t in (query, key, value)], (sink.requires_grad_() if with_sink else None)


TILINGS = {
    "default": {},
    # every global tile MIN_TILE_ROWS rows, sliding-window steps of one tile
    "one-tile-steps": {"TILE_SCORE_ELEMENTS": 1, "MIN_TILE_ROWS": 3},
    # sliding-window tiles of 2 rows (shorter than the window: a key is in several tiles), many per step
    "many-small-tiles": {"TILE_SCORE_ELEMENTS": 3000, "MIN_TILE_ROWS": 2},
    "single-rows": {"TILE_SCORE_ELEMENTS": 1, "MIN_TILE_ROWS": 1},
}


@pytest.fixture(params=sorted(TILINGS))
def tiling(request, monkeypatch):
    for name, value in TILINGS[request.param].items():
        monkeypatch.setattr(kernel, name, value)


@pytest.mark.parametrize("seq, past", [(1, 0), (7, 0), (40, 0), (37, 3), (21, 20)])
@pytest.mark.parametrize("window", [None, 0, 1, 5, 16, 60])
@pytest.mark.parametrize("with_sink", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_output_and_gradients_equal_the_dense_fp64_reference(tiling, seq, past, window, with_sink, groups):
    (query, key, value), sink = random_inputs(seq, past, groups, with_sink)
    inputs = [query, key, value] + ([sink] if with_sink else [])
    actual = attention(query, key, value, scale=SCALE, window=window, sink=sink, past=past)
    expected = dense_reference(query, key, value, window=window, sink=sink, past=past)
    assert torch.allclose(actual, expected, atol=1e-12, rtol=0)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=expected.dtype)
    for got, want in zip(torch.autograd.grad(actual, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        assert torch.allclose(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("window, with_sink", [(None, False), (6, True)])
def test_bf16_stays_within_bf16_rounding_of_the_reference(window, with_sink):
    (query, key, value), sink = random_inputs(50, 0, 2, with_sink)
    expected = dense_reference(query, key, value, window=window, sink=sink, past=0)
    low = [t.detach().bfloat16() for t in (query, key, value)]
    actual = attention(*low, scale=SCALE, window=window, sink=None if sink is None else sink.detach().bfloat16())
    assert actual.dtype == torch.bfloat16
    assert torch.allclose(actual.double(), expected, atol=3e-2, rtol=0)


def test_bad_shapes_are_refused():
    (query, key, value), _ = random_inputs(8, 2, 2, False)
    with pytest.raises(ValueError, match="past"):
        attention(query, key, value, scale=SCALE, past=1)
    with pytest.raises(ValueError, match="KV heads"):
        attention(query, key[:, :1].expand(-1, 3, -1, -1), value[:, :1].expand(-1, 3, -1, -1), scale=SCALE, past=2)
    with pytest.raises(ValueError, match="window"):
        attention(query, key, value, scale=SCALE, window=-1, past=2)


def largest_intermediate(seq: int, window: int | None) -> int:
    (query, key, value), sink = random_inputs(seq, 0, 1, True, batch=1, dtype=torch.float32)
    with LargestTensor() as mode:
        attention(query, key, value, scale=SCALE, window=window, sink=sink).sum().backward()
    return mode.largest


@pytest.mark.parametrize("window", [None, 16])
def test_memory_grows_linearly_with_the_sequence(monkeypatch, window):
    """Global attention with a sink included (the old path fell back to a full-width window): forward and backward
    allocate O(seq x tile), never seq x seq, once a tile is shorter than the sequence."""
    monkeypatch.setattr(kernel, "TILE_SCORE_ELEMENTS", 1 << 16)
    short, long = largest_intermediate(512, window), largest_intermediate(2048, window)
    assert long <= 4 * short * 1.05
    assert long < HEADS * 2048 * 2048 / 10


@pytest.mark.parametrize("with_sink", [False, True])
def test_autograd_keeps_only_inputs_output_and_the_sinks_share(with_sink):
    """What the planner's activation model counts: q, k, v, the output (in sequence-first memory, so the output
    projection's [s, b, h * dv] input is the same storage) and, with a sink, one number per query row and head."""
    (query, key, value), sink = random_inputs(40, 0, 2, with_sink, dtype=torch.float32)
    saved: dict[int, torch.Tensor] = {}

    def keep(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out = attention(query, key, value, scale=SCALE, window=5, sink=sink)
    context = out.permute(2, 0, 1, 3).reshape(40, 2, -1)
    expected = {t.untyped_storage().data_ptr() for t in (query, key, value, context)}
    if with_sink:
        expected.add(sink.untyped_storage().data_ptr())
        shares = [t for ptr, t in saved.items() if ptr not in expected]
        assert [(tuple(t.shape), t.dtype) for t in shares] == [((2, HEADS, 40), torch.float32)]
        expected.add(shares[0].untyped_storage().data_ptr())
    assert set(saved) == expected
