"""MiMo's hybrid self-attention as a megatron-core module: one class for global (GA) and sliding-window (SWA)
layers, the difference carried by an ``AttentionGeometry`` in the layer spec.

megatron-core's ``SelfAttention`` assumes one KV-head count for the whole model and equal query/key and value
head dims; MiMo has 4 KV heads on GA layers and 8 on SWA layers, 192-dim queries/keys and 128-dim values. So this
module owns its projections (built from the spec's ColumnParallelLinear / RowParallelLinear), its RoPE and its
value scaling, and hands a per-layer view of the TransformerConfig to the core attention (the same fields
Transformer Engine's wrapper reads: ``num_query_groups``, ``window_size``, ``softmax_type``).

Fused QKV layout: the output features of ``linear_qkv`` are grouped by KV head g, each group holding
[queries of the heads served by g | key g | value g]. Tensor parallelism splits that dimension into contiguous
chunks, so rank r holds whole KV groups r*G/tp .. (r+1)*G/tp - 1 and exactly the query heads they serve: the
sharded layout is independent of the TP degree, and checkpoints reshard across TP sizes by plain slicing.
"""

import copy
import math
from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_rank, get_pg_size

from mimo.model.config import AttentionType, ModelConfig
from mimo.model.core_attention import SINK_SOFTMAX_TYPE, LocalCoreAttention
from mimo.model.documents import thd_packed_seq_params


@dataclass(frozen=True)
class AttentionGeometry:
    """Everything that differs between attention layers, resolved from the ModelConfig by the layer spec."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    rotary_dim: int
    rope_theta: float
    window: int | None
    """Previous tokens a query sees besides itself; None = unbounded causal."""
    sink: bool
    value_scale: float

    @classmethod
    def for_layer(cls, cfg: ModelConfig, kind: AttentionType) -> "AttentionGeometry":
        return cls(
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_kv_heads(kind),
            head_dim=cfg.head_dim,
            v_head_dim=cfg.v_head_dim,
            rotary_dim=cfg.rotary_dim,
            rope_theta=cfg.rope_base(kind),
            window=cfg.window(kind),
            sink=cfg.has_sink(kind),
            value_scale=cfg.attention_value_scale,
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def group_width(self) -> int:
        """Output features of linear_qkv per KV group: its queries, its key, its value."""
        return self.heads_per_group * self.head_dim + self.head_dim + self.v_head_dim


@dataclass
class MimoAttentionSubmodules:
    linear_qkv: ModuleSpec | type
    core_attention: ModuleSpec | type
    linear_proj: ModuleSpec | type


class MimoAttention(MegatronModule):
    """Self-attention of one MiMo layer. Input and output [s, b, hidden] (sequence-parallel shards under SP).

    ``rotary_pos_emb`` carries token positions, [s, b] integers (see ``MimoGPTModel``), not precomputed
    frequencies: each layer type has its own RoPE base, so the frequencies are built here. Without positions
    the layer uses 0 .. s-1. ``attention_mask`` is None or the document ids of the whole sequence
    (``mimo.model.documents``): each token then attends only to its own document.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MimoAttentionSubmodules,
        layer_number: int,
        geometry: AttentionGeometry,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.geometry = geometry
        tp = get_pg_size(self.tp_group)
        if geometry.num_kv_heads % tp:
            raise ValueError(
                f"tensor parallelism {tp} does not divide the {geometry.num_kv_heads} KV heads of layer"
                f" {layer_number}; KV heads are not replicated across ranks, use a TP degree dividing the KV head"
                " counts of every layer type"
            )
        self.groups_per_rank = geometry.num_kv_heads // tp
        self.heads_per_rank = geometry.num_heads // tp
        self.checkpoint_core_attention = (
            config.recompute_granularity == "selective" and "core_attn" in config.recompute_modules
        )

        self.linear_qkv = build_module(
            submodules.linear_qkv,
            config.hidden_size,
            geometry.num_kv_heads * geometry.group_width,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=self.tp_group,
        )
        self.core_attention = build_module(
            submodules.core_attention,
            config=core_attention_config(config, geometry),
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            attention_type="self",
            softmax_scale=1.0 / math.sqrt(geometry.head_dim),
            k_channels=geometry.head_dim,
            v_channels=geometry.v_head_dim,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        if geometry.sink:
            self._init_sink(self.core_attention.softmax_offset)
        self.linear_proj = build_module(
            submodules.linear_proj,
            geometry.num_heads * geometry.v_head_dim,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=self.tp_group,
        )

    def _init_sink(self, sink: torch.nn.Parameter) -> None:
        """Initialise the sink like every other weight (normal, init std), whichever backend created it.

        The full [num_heads] vector is drawn from the default generator and this rank keeps its heads, as
        megatron's CPU initialisation does for the projections, so the initial model does not depend on TP.
        """
        if not self.config.perform_initialization:
            return
        full = torch.empty(self.geometry.num_heads, dtype=torch.float32)
        self.config.init_method(full)
        rank = get_pg_rank(self.tp_group)
        with torch.no_grad():
            sink.copy_(full[rank * self.heads_per_rank : (rank + 1) * self.heads_per_rank])

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        inference_context: object | None = None,
        rotary_pos_emb: torch.Tensor | None = None,
        rotary_pos_cos: torch.Tensor | None = None,
        rotary_pos_sin: torch.Tensor | None = None,
        rotary_pos_cos_sin: torch.Tensor | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        sequence_len_offset: torch.Tensor | None = None,
        *,
        inference_params: object | None = None,
    ):
        unsupported = {
            "inference_context": inference_context or inference_params,
            "rotary_pos_cos": rotary_pos_cos,
            "rotary_pos_sin": rotary_pos_sin,
            "rotary_pos_cos_sin": rotary_pos_cos_sin,
            "attention_bias": attention_bias,
            "packed_seq_params": packed_seq_params,
        }
        given = [name for name, value in unsupported.items() if value is not None]
        if given:
            raise ValueError(
                f"MimoAttention got {', '.join(given)}: it is always causal (windowed on SWA layers), trains on"
                " fixed-length [s, b] batches, takes positions through rotary_pos_emb and document ids through"
                " attention_mask; pass None"
            )
        geo = self.geometry
        qkv, _ = self.linear_qkv(hidden_states)
        seq, batch = qkv.shape[:2]
        qkv = qkv.view(seq, batch, self.groups_per_rank, geo.group_width)
        query, key, value = torch.split(qkv, [geo.heads_per_group * geo.head_dim, geo.head_dim, geo.v_head_dim], dim=-1)
        query = query.reshape(seq, batch, self.heads_per_rank, geo.head_dim)
        value = value * geo.value_scale

        freqs = self._rope_freqs(rotary_pos_emb, seq, qkv.device)
        query = apply_rotary_pos_emb(query, freqs, self.config, cp_group=self.pg_collection.cp)
        key = apply_rotary_pos_emb(key, freqs, self.config, cp_group=self.pg_collection.cp)

        if self.checkpoint_core_attention and self.training:
            context = tensor_parallel.checkpoint(self._core_attention, False, query, key, value, attention_mask)
        else:
            context = self._core_attention(query, key, value, attention_mask)
        return self.linear_proj(context)

    def _core_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, documents: torch.Tensor | None
    ) -> torch.Tensor:
        """mimo's core attention takes the document ids as they are; Transformer Engine's takes the documents as
        THD sequences (the batch laid end to end)."""
        if documents is None or isinstance(self.core_attention, LocalCoreAttention):
            return self.core_attention(query, key, value, documents, attn_mask_type=self.attn_mask_type)
        if get_pg_size(self.pg_collection.cp) > 1:
            raise ValueError(
                "document masking with Transformer Engine's attention under context parallelism is not supported;"
                " set parallel.cp=1 or data.reset_attention_mask=false"
            )
        seq, batch = query.shape[:2]
        packed = [t.transpose(0, 1).flatten(0, 1) for t in (query, key, value)]  # [b * s, heads, dim]
        context = self.core_attention(
            *packed, None, attn_mask_type=self.attn_mask_type, packed_seq_params=thd_packed_seq_params(documents)
        )
        return context.view(batch, seq, -1).transpose(0, 1)

    def _rope_freqs(self, positions: torch.Tensor | None, seq: int, device: torch.device) -> torch.Tensor:
        """RoPE angles [s, b or 1, 1, rotary_dim] in FP32, halves repeated (NeoX rotate-half layout)."""
        if positions is None:
            positions = torch.arange(seq, device=device).unsqueeze(1)
        elif positions.dim() != 2 or positions.shape[0] != seq:
            raise ValueError(
                f"rotary_pos_emb must hold token positions shaped [s={seq}, b], got {tuple(positions.shape)}"
            )
        dim = self.geometry.rotary_dim
        inv_freq = 1.0 / (
            self.geometry.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
        )
        angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
        return torch.cat((angles, angles), dim=-1).unsqueeze(2)


def core_attention_config(config: TransformerConfig, geometry: AttentionGeometry) -> TransformerConfig:
    """A copy of the shared config describing this layer's attention to the core-attention backend.

    A shallow copy, taken at build time: the core attention only reads static shape fields from it. The fields
    the training loop changes while running (MTP loss weight, MoE aux-loss coefficient, expert-bias rate) are
    read by other modules from the shared config, never from this copy.
    """
    layer_config = copy.copy(config)
    layer_config.num_query_groups = geometry.num_kv_heads
    layer_config.window_size = None if geometry.window is None else (geometry.window, 0)
    layer_config.softmax_type = SINK_SOFTMAX_TYPE if geometry.sink else "vanilla"
    return layer_config
