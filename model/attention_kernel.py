"""Exact causal softmax attention in O(seq x tile) memory, for the local backend: global or sliding-window, with
or without a per-head sink logit, with ``past`` keys before the first query (context parallelism).

torch's CPU SDPA takes its O(seq^2) math path whenever the query/key and value head dims differ (MiMo: 192 and
128), and takes neither a sink nor a window, so mimo computes attention itself, in the flash-attention scheme:

* queries are cut into tiles of rows; a tile meets only the keys its rows can see (every key up to its last query
  on global layers, from ``window`` before its first query on sliding-window layers) and computes its rows'
  softmax exactly, in one piece;
* the backward recomputes each tile's probabilities and forms the gradients tile by tile; autograd keeps only
  q, k, v, the output and, with a sink, one number per row (``_TiledAttention``).

A whole row fits in a tile because tiles are short: ``TILE_SCORE_ELEMENTS`` bounds the scores a step holds
(global tiles get fewer rows the more keys they meet; sliding-window tiles of ``window / 4`` rows are batched
into steps). On CPU that beats an online softmax over key blocks: one fused softmax per row, large matrix
products, few Python calls, and a step's scores stay in cache between its products and its softmax.

Grouped-query attention: the query heads sharing a KV head are stacked along a tile's rows, so each tile is one
matrix product per KV head and keys and values are never copied per query head.

Which keys a query sees is decided in one place, ``_visible``, from token positions and, with document masking
(``documents``: the document id of every key, data.reset_attention_mask), from the documents of query and key: a
query sees only keys of its own document. Without documents only a tile's edge bands hold hidden keys; with them
the condition is applied over the whole tile, so the cost stays O(seq x tile) (O(seq x window) on sliding-window
layers) however many documents a sequence packs.
"""

from dataclasses import dataclass

import torch

TILE_SCORE_ELEMENTS = 1 << 21
"""Upper bound on the scores of one step (batch x heads x rows x keys of its tiles; 8 MiB in FP32): small enough
to stay in the CPU caches between a tile's matrix products and its softmax (measured fastest at 16K tokens for
both kinds of layer), and what keeps memory O(seq x tile) at any sequence length."""
MIN_TILE_ROWS = 16
"""Query rows per head below which a tile's matrix products get too thin to run at speed."""
WINDOW_TILE_FRACTION = 4
"""Sliding-window tiles hold window / 4 query rows: each meets 1.25 windows of keys, a fifth of them masked
(longer tiles waste more, shorter ones run thinner products; measured at window 128)."""


@dataclass(frozen=True)
class Step:
    """Tiles computed together: ``tiles`` tiles of ``rows`` queries from query row ``first`` on; tile t meets the
    ``span`` keys from index ``key_start + t * rows`` of the keys left-padded by ``Geometry.pad``."""

    first: int
    tiles: int
    rows: int
    key_start: int
    span: int

    @property
    def end(self) -> int:
        return self.first + self.tiles * self.rows


@dataclass(frozen=True)
class Geometry:
    """Where the queries sit among the keys and what each sees: query i is at key position ``past + i`` and sees
    keys ``past + i - window .. past + i`` (all earlier keys when ``window`` is None)."""

    seq: int
    past: int
    window: int | None

    @property
    def pad(self) -> int:
        """Zero keys in front of the first, so every sliding-window tile has a full span (they are masked)."""
        return 0 if self.window is None else max(0, self.window - self.past)

    def steps(self, batch_heads: int) -> list[Step]:
        """Global layers: one tile per step, each as many rows as keep its scores within TILE_SCORE_ELEMENTS.
        Sliding-window layers: tiles of equal shape, batched into steps within the same bound."""
        if self.window is None:
            rows = min(max(TILE_SCORE_ELEMENTS // (batch_heads * (self.past + self.seq)), MIN_TILE_ROWS), self.seq)
            return [
                Step(first, 1, min(rows, self.seq - first), 0, self.past + min(first + rows, self.seq))
                for first in range(0, self.seq, rows)
            ]
        rows = min(max(self.window // WINDOW_TILE_FRACTION, MIN_TILE_ROWS), self.seq)
        span = rows + self.window
        per_step = max(TILE_SCORE_ELEMENTS // (batch_heads * rows * span), 1)
        steps, first = [], 0
        while first < self.seq:
            tiles = min(per_step, (self.seq - first) // rows) or 1
            height = rows if (self.seq - first) >= rows else self.seq - first
            key_start = self.past + first - self.window + self.pad
            steps.append(Step(first, tiles, height, key_start, height + self.window))
            first += tiles * height
        return steps

    def visible(self, step: Step, device: torch.device, documents: torch.Tensor | None = None) -> torch.Tensor:
        """[tiles, rows, span] booleans: whether each query of the step sees each key of its tile; [b, tiles, rows,
        span] with ``documents``, the document id of every key as [b, pad + past + seq] (padding keys first)."""
        offsets = torch.arange(step.tiles, device=device).view(-1, 1) * step.rows
        query_pos = self.past + step.first + offsets + torch.arange(step.rows, device=device)
        key_pos = step.key_start - self.pad + offsets + torch.arange(step.span, device=device)
        if documents is None:
            return _visible(query_pos, key_pos, self.window)
        return _visible(
            query_pos, key_pos, self.window, documents[:, query_pos + self.pad], documents[:, key_pos + self.pad]
        )

    def masked_bands(self, step: Step) -> list[tuple[int, int]]:
        """Column ranges of a tile where some of its queries do not see a key (every query sees every other
        column): on global layers the keys after the first query; on sliding-window tiles also those before the
        last query's window, and any padding keys."""
        if self.window is None:
            start = step.span - step.rows + 1
            return [(start, step.span)] if start < step.span else []
        left = min(max(step.rows - 1, self.pad - step.key_start), step.span)
        right = self.window + 1
        if left >= right:
            return [(0, step.span)]
        return [band for band in ((0, left), (right, step.span)) if band[0] < band[1]]


def _visible(
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    window: int | None,
    query_doc: torch.Tensor | None = None,
    key_doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """[..., queries, keys] booleans from [..., queries] and [..., keys] positions: causal, within the window when
    there is one, never a padding key (negative position), and with document ids (shaped as the positions, with
    leading batch dimensions) only keys of the query's own document."""
    query_pos, key_pos = query_pos.unsqueeze(-1), key_pos.unsqueeze(-2)
    seen = (key_pos <= query_pos) & (key_pos >= 0)
    if window is not None:
        seen &= key_pos >= query_pos - window
    if query_doc is not None:
        seen = seen & (query_doc.unsqueeze(-1) == key_doc.unsqueeze(-2))
    return seen


class _Tiles:
    """One attention call's tensors arranged for tiling. A step's per-query tensors are [b, g, tiles, rows x heads
    per group, ...]: a tile's rows are its queries, each with the query heads of one KV group, in the order of
    mimo's sequence-first activations ([s, b, heads, d] in memory), so that with one KV group per rank and a
    micro-batch of one a tile is a view, not a copy. Keys and values are windows of the left-padded
    [b, g, pad + past + s, d] tensors, the keys multiplied by the softmax scale once for all tiles; document ids
    (when given) are left-padded alike."""

    def __init__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float,
        geometry: Geometry,
        documents: torch.Tensor | None = None,
    ) -> None:
        batch, heads, _, _ = query.shape
        self.groups = key.shape[1]
        self.per_group = heads // self.groups
        self.query = query
        self.key = torch.nn.functional.pad(key, (0, 0, geometry.pad, 0)) * scale
        self.value = torch.nn.functional.pad(value, (0, 0, geometry.pad, 0))
        self.documents = None if documents is None else torch.nn.functional.pad(documents, (geometry.pad, 0))
        self.scale = scale
        self.geometry = geometry
        self.compute_dtype = torch.promote_types(query.dtype, torch.float32)
        self.steps = geometry.steps(batch * heads)

    def to_tiles(self, tensor: torch.Tensor, step: Step) -> torch.Tensor:
        """The step's rows of a per-query tensor [b, h, s, ...] as [b, g, tiles, rows x heads per group, ...]."""
        rows = tensor[:, :, step.first : step.end].unflatten(1, (self.groups, self.per_group))
        rows = rows.unflatten(3, (step.tiles, step.rows)).movedim(2, 4)  # [b, g, tiles, rows, heads per group, ...]
        return rows.reshape(*rows.shape[:3], -1, *rows.shape[5:])

    def from_tiles(self, tiles: torch.Tensor, step: Step) -> torch.Tensor:
        """The inverse of ``to_tiles``: [b, g, tiles, rows x heads per group, ...] as [b, h, rows of the step, ...]."""
        rows = tiles.unflatten(3, (step.rows, self.per_group)).movedim(4, 2)
        return rows.flatten(3, 4).flatten(1, 2)

    def windows(self, tensor: torch.Tensor, step: Step) -> torch.Tensor:
        """The step's tiles of keys or values: [b, g, tiles, span, d] (overlapping views, no copy)."""
        length = (step.tiles - 1) * step.rows + step.span
        return tensor[:, :, step.key_start : step.key_start + length].unfold(2, step.span, step.rows).transpose(-1, -2)

    def scores(self, queries: torch.Tensor, step: Step) -> torch.Tensor:
        """Scaled scores [b, g, tiles, rows x heads, span] in at least FP32, invisible keys at -inf."""
        scores = torch.matmul(queries, self.windows(self.key, step).transpose(-1, -2)).to(self.compute_dtype)
        bands = self.geometry.masked_bands(step) if self.documents is None else [(0, step.span)]
        if bands:
            per_row = scores.unflatten(3, (step.rows, self.per_group))  # [b, g, tiles, rows, heads per group, span]
            hidden = ~self.geometry.visible(step, scores.device, self.documents).unsqueeze(-2)
            if self.documents is not None:
                hidden = hidden.unsqueeze(1)  # [b, 1 (groups), tiles, rows, 1, span]
            for start, end in bands:
                per_row[..., start:end].masked_fill_(hidden[..., start:end], float("-inf"))
        return scores

    def add_to_windows(self, total: torch.Tensor, grads: torch.Tensor, step: Step) -> None:
        """Add the step's per-tile key (or value) gradients [b, g, tiles, span, d] into ``total`` [b, g, keys, d]:
        tiles overlap, so each key sums the gradients of every tile it is in."""
        if step.tiles == 1:
            total[:, :, step.key_start : step.key_start + step.span] += grads[:, :, 0]
            return
        for offset in range(0, step.span, step.rows):
            width = min(step.rows, step.span - offset)
            start = step.key_start + offset
            blocks = total[:, :, start : start + step.tiles * step.rows].unflatten(2, (step.tiles, step.rows))
            blocks[:, :, :, :width] += grads[:, :, :, offset : offset + width]


def _forward(tiles: _Tiles, out: torch.Tensor, lse: torch.Tensor | None) -> None:
    """Fill ``out`` [b, h, s, dv] with the attention over the keys alone, and ``lse`` [b, h, s] (when given) with
    each row's log-sum-exp over them, step by step."""
    for step in tiles.steps:
        scores = tiles.scores(tiles.to_tiles(tiles.query, step), step)
        if lse is not None:
            row_max, top = scores.max(-1, keepdim=True)
        probs = torch.softmax(scores, -1)
        if lse is not None:
            # softmax gives the top key exp(max - lse): lse = max - log(p_top), with no extra pass over the scores
            lse[:, :, step.first : step.end] = tiles.from_tiles(row_max - probs.gather(-1, top).log(), step)[..., 0]
        values = tiles.windows(tiles.value, step)
        out[:, :, step.first : step.end] = tiles.from_tiles(torch.matmul(probs.to(values.dtype), values), step)


def _backward(
    tiles: _Tiles, out: torch.Tensor, grad_out: torch.Tensor, share: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dq, dk, dv and (with a sink, whose ``share`` [b, h, s] is given) d sink, probabilities recomputed tile by
    tile. The softmax backward's row term rowsum(dO * O) is formed per step too, where the rows are at hand."""
    dtype, compute, device = tiles.key.dtype, tiles.compute_dtype, tiles.key.device
    grad_query = torch.empty(tiles.query.shape, dtype=dtype, device=device)
    # Room for one more tile row past the end: the overlap-add of the last tile steps in whole tiles.
    slack = max(step.rows for step in tiles.steps)
    grad_key, grad_value = (
        torch.zeros(*t.shape[:2], t.shape[2] + slack, t.shape[3], dtype=compute, device=device)
        for t in (tiles.key, tiles.value)
    )
    grad_sink = None if share is None else torch.zeros(tiles.groups, tiles.per_group, dtype=compute, device=device)
    for step in tiles.steps:
        queries = tiles.to_tiles(tiles.query, step)
        probs = torch.softmax(tiles.scores(queries, step), -1)
        grad_rows = tiles.to_tiles(grad_out, step)
        delta = (grad_rows.to(compute) * tiles.to_tiles(out, step)).sum(-1, keepdim=True)  # rowsum(dO * O)
        if share is not None:
            kept = tiles.to_tiles(share, step).unsqueeze(-1)
            # The sink is one more logit with no value: d loss / d sink = -sum over rows of p_sink * rowsum(dO * O).
            grad_sink -= ((1 - kept) * delta).unflatten(3, (step.rows, tiles.per_group)).sum((0, 2, 3, 5))
            # The keys' weights are share x their softmax: run the softmax backward on dO * share.
            grad_rows, delta = grad_rows * kept.to(dtype), delta * kept
        tiles.add_to_windows(grad_value, torch.matmul(probs.transpose(-1, -2).to(dtype), grad_rows), step)
        grad_probs = torch.matmul(grad_rows, tiles.windows(tiles.value, step).transpose(-1, -2)).to(compute)
        grad_scores = grad_probs.sub_(delta).mul_(probs).to(dtype)
        grad_query[:, :, step.first : step.end] = tiles.from_tiles(
            torch.matmul(grad_scores, tiles.windows(tiles.key, step)), step
        )
        tiles.add_to_windows(grad_key, torch.matmul(grad_scores.transpose(-1, -2), queries), step)
    keys = slice(tiles.geometry.pad, tiles.key.shape[2])
    grad_key = grad_key[:, :, keys].mul_(tiles.scale).to(dtype)
    return grad_query, grad_key, grad_value[:, :, keys].to(dtype), None if grad_sink is None else grad_sink.flatten()


class _TiledAttention(torch.autograd.Function):
    """The sink enters as a per-row factor: with it, row i's weights are its softmax over the keys times
    ``share_i`` = 1 / (1 + exp(sink - lse_i)), the mass the keys keep (lse_i: log-sum-exp over the keys). So the
    tiles compute attention over the keys alone and the output is scaled by the share."""

    @staticmethod
    def forward(ctx, query, key, value, sink, scale: float, geometry: Geometry, documents):
        batch, heads, seq, _ = query.shape
        tiles = _Tiles(query, key, value, scale, geometry, documents)
        # Sequence-first memory, as the queries: the caller's [s, b, heads * dv] view of it needs no copy.
        out = query.new_empty(seq, batch, heads, value.shape[-1]).permute(1, 2, 0, 3)
        lse = None if sink is None else query.new_empty((seq, batch, heads), dtype=tiles.compute_dtype)
        _forward(tiles, out, None if lse is None else lse.permute(1, 2, 0))
        share = None
        if sink is not None:
            share = torch.sigmoid(lse.permute(1, 2, 0) - sink.to(lse.dtype).view(1, -1, 1))
            out.mul_(share.unsqueeze(-1))
        ctx.save_for_backward(query, key, value, sink, out, share, documents)
        ctx.scale, ctx.geometry = scale, geometry
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, sink, out, share, documents = ctx.saved_tensors
        tiles = _Tiles(query, key, value, ctx.scale, ctx.geometry, documents)
        grad_query, grad_key, grad_value, grad_sink = _backward(tiles, out, grad_out, share)
        if grad_sink is not None:
            grad_sink = grad_sink.to(sink.dtype)
        return grad_query, grad_key, grad_value, grad_sink, None, None, None


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    sink: torch.Tensor | None = None,
    past: int = 0,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of ``query`` [b, h, s, dk] over ``key`` [b, g, past + s, dk] and ``value``
    [b, g, past + s, dv] (h a multiple of g: query head j uses KV head j // (h / g)) -> [b, h, s, dv].

    Query i sits at key position ``past + i`` and sees keys ``past + i - window .. past + i`` (every earlier key
    when ``window`` is None). ``sink`` [h] adds exp(sink) to each row's softmax denominator: one more logit,
    not scaled, with no value, so the weights on real keys sum to less than one. ``documents`` [b, past + s]
    (integers; the queries' are the last s) restricts each query to the keys of its own document: every document
    of a packed sequence is attended to as if it were alone (its own sink term included).
    """
    batch, heads, seq, _ = query.shape
    if key.shape[2] != past + seq or value.shape[2] != past + seq or past < 0:
        raise ValueError(
            f"attention got {key.shape[2]} keys and {value.shape[2]} values for {seq} queries with past={past};"
            " pass past + seq of each"
        )
    if documents is not None and tuple(documents.shape) != (batch, past + seq):
        raise ValueError(f"documents must be [b={batch}, past + s={past + seq}] ids, got {tuple(documents.shape)}")
    if heads % key.shape[1]:
        raise ValueError(f"{heads} query heads cannot share {key.shape[1]} KV heads evenly")
    if window is not None and window < 0:
        raise ValueError(f"window={window}: pass the number of earlier keys a query sees (>= 0), or None")
    if window is not None and window >= past + seq - 1:
        window = None  # the window reaches the first key from every query: plain causal attention
    geometry = Geometry(seq=seq, past=past, window=window)
    return _TiledAttention.apply(query, key, value, sink, scale, geometry, documents)
