"""Document masking in mimo's tiled attention kernel: a packed sequence attended with per-key document ids equals
each document attended on its own (dense FP64, written plainly here), for outputs and the gradients of queries,
keys, values and sink; global and sliding-window layers, sinks, grouped KV heads, past keys, several tilings."""

import pytest
import torch

import mimo.model.attention_kernel as kernel
from mimo.model.attention_kernel import attention

HEADS, QK_DIM, V_DIM, SCALE = 4, 12, 8, 0.3
TILINGS = {
    "default": {},
    "one-tile-steps": {"TILE_SCORE_ELEMENTS": 1, "MIN_TILE_ROWS": 3},
    "many-small-tiles": {"TILE_SCORE_ELEMENTS": 3000, "MIN_TILE_ROWS": 2},
}


@pytest.fixture(params=sorted(TILINGS))
def tiling(request, monkeypatch):
    for name, value in TILINGS[request.param].items():
        monkeypatch.setattr(kernel, name, value)


def alone(query, key, value, *, window, sink):
    """One document on its own: query i (of n) at key position len(keys) - n + i sees the keys at most ``window``
    before it, softmax over them and the sink logit, dense."""
    seq, keys = query.shape[1], key.shape[1]
    past = keys - seq
    repeat = query.shape[0] // key.shape[0]
    key, value = key.repeat_interleave(repeat, 0), value.repeat_interleave(repeat, 0)
    scores = query @ key.transpose(-1, -2) * SCALE
    query_pos = torch.arange(seq).unsqueeze(1) + past
    key_pos = torch.arange(keys).unsqueeze(0)
    visible = key_pos <= query_pos
    if window is not None:
        visible &= key_pos >= query_pos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    if sink is not None:
        scores = torch.cat([scores, sink.view(-1, 1, 1).expand(*scores.shape[:-1], 1)], dim=-1)
    probs = scores.softmax(-1)
    return probs[..., :keys] @ value


def per_document_reference(query, key, value, documents, *, window, sink):
    """[b, h, s, dv]: every document of every row cut out and attended to alone; queries are the last s keys."""
    batch, _, seq, _ = query.shape
    past = key.shape[2] - seq
    rows = []
    for row in range(batch):
        parts = []
        for document in documents[row, past:].unique_consecutive():
            key_index = (documents[row] == document).nonzero().flatten()
            query_index = key_index[key_index >= past] - past
            parts.append(
                alone(
                    query[row][:, query_index],
                    key[row][:, key_index],
                    value[row][:, key_index],
                    window=window,
                    sink=sink,
                )
            )
        rows.append(torch.cat(parts, dim=1))
    return torch.stack(rows)


def packed_documents(lengths_per_row: list[list[int]]) -> torch.Tensor:
    """[b, sum of lengths] document ids, ascending along each row (as eod tokens number them)."""
    return torch.stack(
        [torch.cat([torch.full((length,), doc) for doc, length in enumerate(lengths)]) for lengths in lengths_per_row]
    )


def inputs(keys: int, seq: int, groups: int, with_sink: bool, batch: int):
    gen = torch.Generator().manual_seed(keys * 31 + seq)

    def sequence_first(length, heads, dim):
        return torch.randn(length, batch, heads, dim, generator=gen, dtype=torch.float64).permute(1, 2, 0, 3)

    query = sequence_first(seq, HEADS, QK_DIM)
    key, value = sequence_first(keys, groups, QK_DIM), sequence_first(keys, groups, V_DIM)
    sink = (torch.randn(HEADS, generator=gen, dtype=torch.float64) * 2).requires_grad_() if with_sink else None
    return [t.requires_grad_() for t in (query, key, value)], sink


LAYOUTS = {
    # documents of every size, one of a single token; rows packed differently
    "mixed": ([[5, 1, 17, 9, 8], [20, 20]], 0),
    # past keys (a context-parallel chunk) whose first document began in the past
    "past": ([[9, 4, 30], [3, 30, 10]], 6),
    # one document: plain causal attention
    "one": ([[33], [33]], 0),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("window", [None, 0, 3, 8])
@pytest.mark.parametrize("with_sink", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_packed_documents_equal_each_document_alone(tiling, layout, window, with_sink, groups):
    lengths, past = LAYOUTS[layout]
    documents = packed_documents(lengths)
    keys = documents.shape[1]
    (query, key, value), sink = inputs(keys, keys - past, groups, with_sink, batch=len(lengths))
    trained = [query, key, value] + ([sink] if with_sink else [])
    actual = attention(query, key, value, scale=SCALE, window=window, sink=sink, past=past, documents=documents)
    expected = per_document_reference(query, key, value, documents, window=window, sink=sink)
    assert torch.allclose(actual, expected, atol=1e-12, rtol=0)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=expected.dtype)
    for got, want in zip(torch.autograd.grad(actual, trained, grad), torch.autograd.grad(expected, trained, grad)):
        assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_documents_change_the_result_only_across_boundaries():
    """The masking is not vacuous: a second document's queries differ from unmasked attention, the first's do not."""
    documents = packed_documents([[10, 14]])
    (query, key, value), _ = inputs(24, 24, 2, False, batch=1)
    masked = attention(query, key, value, scale=SCALE, documents=documents)
    plain = attention(query, key, value, scale=SCALE)
    assert torch.equal(masked[:, :, :10], plain[:, :, :10])
    assert not torch.allclose(masked[:, :, 10:], plain[:, :, 10:])


def test_document_ids_of_the_wrong_shape_are_refused():
    (query, key, value), _ = inputs(8, 8, 1, False, batch=1)
    with pytest.raises(ValueError, match=r"documents must be \[b=1, past \+ s=8\]"):
        attention(query, key, value, scale=SCALE, documents=torch.zeros(1, 7, dtype=torch.long))
