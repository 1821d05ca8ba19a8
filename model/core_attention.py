"""Core attention (softmax(QK^T) V) for the local backend: causal global attention and sliding-window attention,
both optionally with a learnable per-head sink logit.

It mirrors the contract of Transformer Engine's core attention as wrapped by megatron-core
(``TEDotProductAttention``), so the two backends are interchangeable in a layer spec:

* the constructor reads the layer's geometry from the (per-layer) TransformerConfig it receives:
  ``num_attention_heads``, ``num_query_groups``, ``window_size = (window, 0)`` or None, and
  ``softmax_type = "learnable"`` when the layer has a sink;
* the sink is a parameter named ``softmax_offset`` with this rank's heads, so checkpoints are portable between
  the CPU and the GPU backends;
* ``forward(query [s, b, np, dk], key [s, b, ng, dk], value [s, b, ng, dv]) -> [s, b, np * dv]``.

Neither kind of layer materialises a sequence x sequence matrix (``mimo.model.attention_kernel``): global
attention runs in O(s * tile) memory, sliding-window attention in O(s * window) time and memory.

Under context parallelism a rank holds two chunks of each sequence's queries; it all-gathers keys and values and
each chunk attends to the keys before it (on sliding-window layers at most ``window`` of them), which is exact.
"""

import math

import torch
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
from mimo.parallel.context_parallel import gather_in_sequence_order, load_balanced_chunks

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
) -> torch.Tensor:
    """Causal attention where query i sees keys i - window .. i, in O(seq * window) time and memory.

    Shapes: query [b, h, s, dk], key [b, g, past + s, dk], value [b, g, past + s, dv] with h a multiple of g
    (query head j uses KV head j // (h / g)); sink [h] or None; returns [b, h, s, dv]. The first ``past`` keys
    precede the first query (context parallelism hands a rank's chunk of queries the keys before it); at most
    ``window`` of them can be seen, so callers pass no more. The sink is one more logit per row (not scaled, no
    value), so the weights on real keys sum to less than one.
    """
    if not 0 <= past <= window:
        raise ValueError(
            f"sliding_window_attention got {past} past keys with window={window}; pass 0 <= past <= window"
        )
    return attention(query, key, value, scale=scale, window=window, sink=sink, past=past)


def causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    sink: torch.Tensor | None = None,
    past: int = 0,
) -> torch.Tensor:
    """Full causal attention, shapes as in ``sliding_window_attention`` (``past`` keys precede the queries), in
    O(seq * tile) memory with or without a sink."""
    return attention(query, key, value, scale=scale, sink=sink, past=past)


class LocalCoreAttention(MegatronModule):
    """Core attention of one MiMo layer on the local backend (CPU, or GPU without Transformer Engine), and of the
    layers with a sink under context parallelism on either backend (see ``mimo.model.specs``).

    The constructor takes TEDotProductAttention's arguments so one attention spec works with either backend;
    ``attention_type``, ``k_channels``, ``v_channels`` and ``cp_comm_type`` need no action here (shapes come with
    the tensors; context parallelism always all-gathers keys and values, see ``forward``).
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
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError(
                "mimo's local core attention is always causal (windowed on SWA layers) and takes no"
                " attention_mask, attention_bias or packed_seq_params; pass None"
            )
        seq, batch = query.shape[:2]
        cp = get_pg_size(self.cp_group)
        if cp > 1:
            out = self._context_parallel(query, key, value, cp)
        else:
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
            out = self._attend(q, k, v, past=0)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
        if self.window is None:
            return causal_attention(q, k, v, scale=self.softmax_scale, sink=self.softmax_offset, past=past)
        return sliding_window_attention(
            q, k, v, window=self.window, scale=self.softmax_scale, sink=self.softmax_offset, past=past
        )

    def _context_parallel(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cp: int) -> torch.Tensor:
        """This rank's queries hold two of the sequence's 2 * cp chunks (``load_balanced_chunks``): gather every
        rank's keys and values into sequence order and let each local chunk meet the keys before and in it (at
        most ``window`` before it on sliding-window layers). The gather's backward sums the key/value gradients
        of all ranks' queries, so the result and its gradients equal the unsplit attention's.

        Memory: keys and values of the whole sequence for this rank's KV heads, as Transformer Engine's
        all-gather mode; queries, scores and outputs stay local.
        """
        keys, values = (gather_in_sequence_order(t, self.cp_group) for t in (key, value))
        q = query.permute(1, 2, 0, 3)  # [b, heads, s_local, dim]
        k, v = (t.permute(1, 2, 0, 3) for t in (keys, values))  # [b, groups, s, dim]
        chunk = query.shape[0] // 2
        outputs = []
        for local, chunk_id in enumerate(load_balanced_chunks(get_pg_rank(self.cp_group), cp)):
            start = chunk_id * chunk
            first_key = 0 if self.window is None else max(0, start - self.window)
            outputs.append(
                self._attend(
                    q[:, :, local * chunk : (local + 1) * chunk],
                    k[:, :, first_key : start + chunk],
                    v[:, :, first_key : start + chunk],
                    past=start - first_key,
                )
            )
        return torch.cat(outputs, dim=2)

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
