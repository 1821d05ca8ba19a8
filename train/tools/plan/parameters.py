"""Parameters of each block and pipeline stage, grouped by how the layout splits them (tensor-parallel,
replicated, expert-parallel) and which of them run FP8 GEMMs."""

from dataclasses import astuple, dataclass

from mimo.model import accounting
from mimo.model.config import AttentionType, ModelConfig
from mimo.parallel.layout import ResolvedLayout

NORMS_PER_LAYER = 2


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one block, grouped by how the layout splits them."""

    tensor_parallel: int = 0
    """Split over tp: attention projections and sinks, dense FFN, embedding/head vocab rows, MTP eh_proj."""
    replicated: int = 0
    """Held whole by every rank of the stage: norms, routers."""
    experts: int = 0
    """Split over ep * etp."""
    fp8_tensor_parallel: int = 0
    """The part of tensor_parallel that runs FP8 GEMMs (all but o_proj, sinks, embedding and head); experts
    always do."""

    def __add__(self, other: "LayerParams") -> "LayerParams":
        return LayerParams(*(a + b for a, b in zip(astuple(self), astuple(other))))


def _attention_params(model: ModelConfig, kind: AttentionType) -> LayerParams:
    """Attention projections and sink (tp) and the layer's two norms (replicated); o_proj stays out of FP8."""
    h = model.hidden_size
    total = accounting.attention_parameters(model, kind)
    heads = model.num_attention_heads
    not_fp8 = heads * model.v_head_dim * h + (heads if model.has_sink(kind) else 0)  # o_proj and sink
    return LayerParams(tensor_parallel=total, replicated=NORMS_PER_LAYER * h, fp8_tensor_parallel=total - not_fp8)


def _dense_ffn_params(model: ModelConfig) -> LayerParams:
    ffn = accounting.mlp_parameters(model.hidden_size, model.ffn_hidden_size)
    return LayerParams(tensor_parallel=ffn, fp8_tensor_parallel=ffn)


def _moe_params(model: ModelConfig) -> LayerParams:
    experts = model.num_experts * accounting.mlp_parameters(model.hidden_size, model.moe_ffn_hidden_size)
    return LayerParams(replicated=model.num_experts * model.hidden_size, experts=experts)


def decoder_layer_params(model: ModelConfig, layer: int) -> LayerParams:
    kind = model.layer_types()[layer]
    ffn = _moe_params(model) if model.is_moe(layer) else _dense_ffn_params(model)
    return _attention_params(model, kind) + ffn


def mtp_block_params(model: ModelConfig) -> LayerParams:
    """eh_proj [2h -> h], one SWA attention and the dense FFN (tp); the block's norms (replicated)."""
    h = model.hidden_size
    eh_proj = 2 * h * h
    attention, ffn = _attention_params(model, AttentionType.SLIDING), _dense_ffn_params(model)
    split = eh_proj + attention.tensor_parallel + ffn.tensor_parallel
    return LayerParams(
        tensor_parallel=split,
        replicated=accounting.mtp_block_parameters(model) - split,
        fp8_tensor_parallel=eh_proj + attention.fp8_tensor_parallel + ffn.fp8_tensor_parallel,
    )


def embedding_params(model: ModelConfig) -> LayerParams:
    return LayerParams(tensor_parallel=model.vocab_size * model.hidden_size)


def head_params(model: ModelConfig) -> LayerParams:
    """The LM head and the final norm."""
    return LayerParams(tensor_parallel=model.vocab_size * model.hidden_size, replicated=model.hidden_size)


def stage_params(model: ModelConfig, layout: ResolvedLayout, rank: int) -> LayerParams:
    layers = layout.rank_layers(rank)
    params = LayerParams()
    for layer in layers:
        params = params + decoder_layer_params(model, layer)
    if rank == 0:
        params = params + embedding_params(model)
    if rank == layout.pp - 1:
        params = params + head_params(model)
        for _ in range(model.mtp_num_layers):
            params = params + mtp_block_params(model)
        if model.mtp_num_layers and layout.pp > 1:
            params = params + embedding_params(model)  # the MTP blocks embed the next tokens here
    return params
