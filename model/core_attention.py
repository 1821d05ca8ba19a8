"""Core attention (softmax(QK^T) V) for the local backend: causal global attention and sliding-window attention,
both optionally with a learnable per-head sink logit.

It mirrors the contract of Transformer Engine's core attention as wrapped by megatron-core
(``TEDotProductAttention``), so the two backends are interchangeable in a layer spec:

* the constructor reads the layer's geometry from the (per-layer) TransformerConfig it receives:
  ``num_attention_heads``, ``num_query_groups``, ``window_size = (window, 0)`` or None, and
  ``softmax_type = "learnable"`` when the layer has a sink;
* the sink is a parameter named ``softmax_offset`` with this rank's heads, so checkpoints are portable between
  the CPU and the GPU backends;
* ``forward(query [s, b, np, dk], key [s, b, ng, dk], value [s, b, ng, dv], attention_mask) -> [s, b, np * dv]``,
  where ``attention_mask`` is None or, with document masking, the document ids of the whole sequence
  (``mimo.model.documents``).

Neither kind of layer materialises a sequence x sequence matrix beyond ``SHORT_ATTENTION_SCORES`` elements: longer
calls run the tiled kernel (``mimo.model.attention_kernel``), global attention in O(s * tile) memory,
sliding-window attention in O(s * window) time and memory.

Under context parallelism a rank holds two chunks of each sequence's queries, and each chunk attends to the keys
before it and its own: on sliding-window layers the ``window`` keys before it, received from the ranks holding
them (``halo_exchange``, or an all-gather with ``cp_comm_type="allgather"``), on global layers all of them
(all-gathered). Both are exact. With document masking each chunk cuts its queries' and keys' document ids out of
the whole sequence's, which every rank holds.
"""

import math

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from megatron.core.utils import divide, get_pg_rank, get_pg_size

from mimo.model.attention_kernel import attention
from mimo.model.config import SHORT_ATTENTION_SCORES
from mimo.parallel.config import ALLGATHER, HALO
from mimo.parallel.context_parallel import gather_in_sequence_order, halo_exchange
from mimo.parallel.sequence_chunks import load_balanced_chunks

KeySpan = tuple[torch.Tensor, torch.Tensor, int]
"""Keys [b, groups, past + chunk, dk], values [b, groups, past + chunk, dv] of one chunk of queries, and ``past``."""

SINK_SOFTMAX_TYPE = "learnable"
"""megatron/TE's name for a softmax whose denominator gains exp(sink_h): the MiMo attention sink."""


def sliding_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    window: int,
    scale: float,
    sink: torch.Tensor | None = None,
    past: int = 0,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention where query i sees keys i - window .. i, in O(seq * window) time and memory.

    Shapes: query [b, h, s, dk], key [b, g, past + s, dk], value [b, g, past + s, dv] with h a multiple of g
    (query head j uses KV head j // (h / g)); sink [h] or None; returns [b, h, s, dv]. The first ``past`` keys
    precede the first query (context parallelism hands a rank's chunk of queries the keys before it); at most
    ``window`` of them can be seen, so callers pass no more. The sink is one more logit per row (not scaled, no
    value), so the weights on real keys sum to less than one. ``documents`` [b, past + s]: a query sees only keys
    of its own document. Short calls without documents run dense (``SHORT_ATTENTION_SCORES``).
    """
    if not 0 <= past <= window:
        raise ValueError(
            f"sliding_window_attention got {past} past keys with window={window}; pass 0 <= past <= window"
        )
    if documents is None and _is_short(query, key):
        return _blocked_window_attention(query, key, value, window=window, scale=scale, sink=sink, past=past)
    return attention(query, key, value, scale=scale, window=window, sink=sink, past=past, documents=documents)


def causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    sink: torch.Tensor | None = None,
    past: int = 0,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full causal attention, shapes as in ``sliding_window_attention`` (``past`` keys precede the queries, and
    ``documents`` restrict each query to its document), in O(seq * tile) memory with or without a sink; short
    calls without documents run dense (``SHORT_ATTENTION_SCORES``; document masking always takes the tiled
    kernel, the one place that applies it)."""
    if documents is None and _is_short(query, key):
        return _dense_causal_attention(query, key, value, scale=scale, sink=sink, past=past)
    return attention(query, key, value, scale=scale, sink=sink, past=past, documents=documents)


def _is_short(query: torch.Tensor, key: torch.Tensor) -> bool:
    batch, heads, queries, _ = query.shape
    return batch * heads * queries * key.shape[2] <= SHORT_ATTENTION_SCORES


def _blocked_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    window: int,
    scale: float,
    sink: torch.Tensor | None = None,
    past: int = 0,
) -> torch.Tensor:
    """``sliding_window_attention`` of a short call, autograd keeping the probabilities.

    Queries are processed in blocks of ``window`` rows; block n (rows n*B .. n*B + B - 1) needs keys
    n*B - window .. n*B + B - 1, i.e. one ``unfold`` window of B + window keys over the left-padded keys.
    The sink enters as one extra logit column per row (not scaled, no value), dropped after the softmax, so
    the weights on real keys sum to less than one.
    """
    batch, heads, seq, head_dim = query.shape
    groups, value_dim = key.shape[1], value.shape[-1]
    if key.shape[2] != past + seq or not 0 <= past <= window:
        raise ValueError(
            f"sliding_window_attention got {key.shape[2]} keys for {seq} queries with past={past} and"
            f" window={window}; pass past + seq keys with 0 <= past <= window"
        )
    # A window reaching past the first key is plain causal attention; clamping keeps the blocks small.
    window = min(window, past + seq - 1)
    block = max(window, 1)
    num_blocks = math.ceil(seq / block)
    padded = num_blocks * block
    span = block + window

    queries = F.pad(query, (0, 0, 0, padded - seq)).view(batch, groups, heads // groups, num_blocks, block, head_dim)
    key_padding = (0, 0, window - past, padded - seq)
    keys = F.pad(key, key_padding).unfold(2, span, block)  # [b, g, nb, dk, span]
    values = F.pad(value, key_padding).unfold(2, span, block)  # [b, g, nb, dv, span]

    scores = torch.matmul(queries, keys.unsqueeze(2)) * scale  # [b, g, h/g, nb, block, span]
    query_pos = torch.arange(padded, device=query.device).view(num_blocks, block, 1)
    key_pos = (
        torch.arange(num_blocks, device=query.device).view(num_blocks, 1, 1) * block
        - window
        + torch.arange(span, device=query.device).view(1, 1, span)
    )
    visible = (key_pos <= query_pos) & (key_pos >= query_pos - window) & (key_pos >= -past)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sink is not None:
        sink_logits = sink.to(scores.dtype).view(1, groups, heads // groups, 1, 1, 1)
        scores = torch.cat([scores, sink_logits.expand(*scores.shape[:-1], 1)], dim=-1)
    # At least FP32 for the softmax, whatever the input precision.
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    if sink is not None:
        probs = probs[..., :-1]
    out = torch.matmul(probs.to(value.dtype), values.transpose(-1, -2).unsqueeze(2))  # [b, g, h/g, nb, block, dv]
    return out.reshape(batch, heads, padded, value_dim)[:, :, :seq]


def _dense_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    sink: torch.Tensor | None = None,
    past: int = 0,
) -> torch.Tensor:
    """``causal_attention`` of a short call. Without a sink this is torch's fused SDPA; a sink needs the extra
    logit column SDPA cannot take, so it runs as a window spanning all keys."""
    seq = query.shape[2]
    if sink is not None:
        return _blocked_window_attention(query, key, value, window=past + seq - 1, scale=scale, sink=sink, past=past)
    if past == 0:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
    # SDPA's is_causal aligns the first query with the first key; here query i sits at key position past + i.
    visible = torch.arange(past + seq, device=query.device) <= past + torch.arange(seq, device=query.device)[:, None]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=visible, scale=scale, enable_gqa=True)


class LocalCoreAttention(MegatronModule):
    """Core attention of one MiMo layer on the local backend (CPU, or GPU without Transformer Engine), and of the
    layers with a sink under context parallelism on either backend (see ``mimo.model.specs``).

    The constructor takes TEDotProductAttention's arguments so one attention spec works with either backend;
    ``attention_type``, ``k_channels`` and ``v_channels`` need no action here (shapes come with the tensors).
    ``cp_comm_type`` is how a sliding-window layer gets its keys under context parallelism: "halo" (None
    defaults to it) or "allgather"; global layers always all-gather.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"attention dropout {dropout} is not implemented by mimo's local core attention (MiMo trains"
                " without dropout); set attention_dropout=0 in the TransformerConfig"
            )
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"mimo attention is causal; got attn_mask_type={attn_mask_type.name}")
        if config.softmax_type not in ("vanilla", SINK_SOFTMAX_TYPE):
            raise ValueError(f"softmax_type={config.softmax_type!r}: mimo uses 'vanilla' or '{SINK_SOFTMAX_TYPE}'")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.tp_group = pg_collection.tp
        self.cp_group = pg_collection.cp
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.window = None if config.window_size is None else config.window_size[0]
        if config.window_size is not None and config.window_size[1] != 0:
            raise ValueError(f"window_size={config.window_size}: only causal windows (left, 0) are supported")
        if cp_comm_type not in (None, HALO, ALLGATHER) or (cp_comm_type == HALO and self.window is None):
            raise ValueError(
                f"cp_comm_type={cp_comm_type!r}: mimo's core attention exchanges keys under context parallelism by"
                f" '{HALO}' (sliding-window layers) or '{ALLGATHER}'"
            )
        self.halo = self.window is not None and cp_comm_type != ALLGATHER
        if config.softmax_type == SINK_SOFTMAX_TYPE:
            heads = divide(config.num_attention_heads, get_pg_size(self.tp_group))
            device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
            self.softmax_offset = torch.nn.Parameter(torch.zeros(heads, dtype=config.params_dtype, device=device))
        else:
            self.softmax_offset = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """``attention_mask``: None, or the document ids [b, s * cp] of the whole sequence (document masking)."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError(
                "mimo's local core attention is always causal (windowed on SWA layers) and takes no attention_bias"
                " or packed_seq_params; pass None (documents come as ids in attention_mask)"
            )
        seq, batch = query.shape[:2]
        cp = get_pg_size(self.cp_group)
        documents = attention_mask
        if documents is not None and (documents.dim() != 2 or tuple(documents.shape) != (batch, seq * cp)):
            raise ValueError(
                f"attention_mask must be the document ids of the whole sequence, [b={batch}, s={seq * cp}]; got"
                f" {tuple(documents.shape)}"
            )
        if cp > 1:
            return self._context_parallel(query, key, value, documents).reshape(seq, batch, -1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
        return self._attend(q, k, v, 0, documents).permute(2, 0, 1, 3).reshape(seq, batch, -1)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, documents: torch.Tensor | None
    ) -> torch.Tensor:
        scale, sink = self.softmax_scale, self.softmax_offset
        if self.window is None:
            return causal_attention(q, k, v, scale=scale, sink=sink, past=past, documents=documents)
        return sliding_window_attention(
            q, k, v, window=self.window, scale=scale, sink=sink, past=past, documents=documents
        )

    def _context_parallel(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, documents: torch.Tensor | None
    ) -> torch.Tensor:
        """This rank's queries hold two of the sequence's 2 * cp chunks (``load_balanced_chunks``); each meets the
        keys it can see before it and its own, so the result and its gradients equal the unsplit attention's.
        Document ids of a chunk's keys (halo or gathered ones included) are cut from the whole sequence's.
        Returns [s_local, b, heads, dv]."""
        chunk = query.shape[0] // 2
        spans = self._halo_spans(key, value, chunk) if self.halo else self._gathered_spans(key, value, chunk)
        chunk_ids = load_balanced_chunks(get_pg_rank(self.cp_group), get_pg_size(self.cp_group))
        outputs = []
        for index, (chunk_id, (keys, values, past)) in enumerate(zip(chunk_ids, spans)):
            start = chunk_id * chunk
            ids = None if documents is None else documents[:, start - past : start + chunk]
            queries = query[index * chunk : (index + 1) * chunk].permute(1, 2, 0, 3)
            outputs.append(self._attend(queries, keys, values, past, ids))
        return torch.cat([out.permute(2, 0, 1, 3) for out in outputs])

    def _halo_spans(self, key: torch.Tensor, value: torch.Tensor, chunk: int) -> list[KeySpan]:
        """Keys and values [b, groups, past + chunk, dim] of each local chunk: the ``window`` before it, received
        from the ranks holding them (keys and values in one message), then its own; and ``past``.

        Memory: this rank's keys and values and 2 * window more, per sliding-window layer."""
        key_dim = key.shape[-1]
        local = torch.cat([key, value], dim=-1)
        spans = []
        for index, halo in enumerate(halo_exchange(local, self.window, self.cp_group)):
            span = torch.cat([halo, local[index * chunk : (index + 1) * chunk]]).permute(1, 2, 0, 3)
            spans.append((span[..., :key_dim], span[..., key_dim:], halo.shape[0]))
        return spans

    def _gathered_spans(self, key: torch.Tensor, value: torch.Tensor, chunk: int) -> list[KeySpan]:
        """Keys and values of each local chunk cut from every rank's, all-gathered in sequence order: all those
        before it (at most ``window`` on sliding-window layers) and its own; and ``past``. The gather's backward
        sums the key/value gradients of all ranks' queries.

        Memory: keys and values of the whole sequence for this rank's KV heads, as Transformer Engine's
        all-gather mode."""
        keys, values = (gather_in_sequence_order(t, self.cp_group).permute(1, 2, 0, 3) for t in (key, value))
        spans = []
        for chunk_id in load_balanced_chunks(get_pg_rank(self.cp_group), get_pg_size(self.cp_group)):
            start = chunk_id * chunk
            first_key = 0 if self.window is None else max(0, start - self.window)
            spans.append(
                (keys[:, :, first_key : start + chunk], values[:, :, first_key : start + chunk], start - first_key)
            )
        return spans

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The sink holds this rank's heads: shard it along dim 0 over tensor parallelism (as TE's wrapper does)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {"softmax_offset": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
