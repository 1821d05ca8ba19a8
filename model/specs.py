"""Layer specs of the MiMo decoder and its MTP block, for the local backend and for Transformer Engine.

``backend_modules`` is the one place that picks implementations. Both backends keep the norms as separate
modules (no layernorm fused into the next linear, no key remapping) and name the sink
``core_attention.softmax_offset``, so a checkpoint has the same keys whichever backend wrote it, and one HF
mapping serves both. The Transformer Engine path is written against megatron-core 0.16.1's TE wrappers but is
not exercised on the CPU machines this code is tested on.
"""

from dataclasses import dataclass

from megatron.core.extensions.transformer_engine import HAVE_TE, TEDotProductAttention, TENorm
from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
    get_mtp_layer_offset,
    get_mtp_num_layers_to_build,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from mimo.model.attention import AttentionGeometry, MimoAttention, MimoAttentionSubmodules
from mimo.model.config import AttentionType, ModelConfig, ModelConfigError
from mimo.model.core_attention import LocalCoreAttention
from mimo.model.norm import RMSNorm


@dataclass(frozen=True)
class BackendModules:
    """The implementations one backend contributes to every spec."""

    provider: BackendSpecProvider
    """megatron's own choice of linears and expert modules for the backend."""
    norm: type
    core_attention: type


def backend_modules(use_te: bool) -> BackendModules:
    """Transformer Engine (GPU) or local modules (CPU, or GPU without TE)."""
    if use_te:
        if not HAVE_TE:
            raise ModelConfigError(
                'Transformer Engine was asked for but is not importable; install it (pip install -e ".[gpu]") or'
                " run on the local backend"
            )
        return BackendModules(provider=TESpecProvider(), norm=TENorm, core_attention=TEDotProductAttention)
    return BackendModules(provider=LocalSpecProvider(), norm=RMSNorm, core_attention=LocalCoreAttention)


CP_COMM_TYPE = "p2p"
"""Transformer Engine's context parallelism for layers without a sink: a ring passing key/value chunks."""


def core_attention_module(backend: BackendModules, geometry: AttentionGeometry, context_parallel: bool) -> type:
    """Under context parallelism, layers with a sink run mimo's core attention on either backend.

    Transformer Engine takes a sink under context parallelism only in its all-to-all mode, which splits heads
    over the context-parallel ranks: tp * cp would have to divide the 8 KV heads, which rules out the long-context
    layouts (tp 4, cp 8). mimo's core attention all-gathers keys and values and is exact for sinks and windows
    under any cp, and the sink layers are the 128-token-window layers, whose O(s * window) attention is a small
    share of the step next to the global layers (which keep Transformer Engine's ring).
    """
    if context_parallel and geometry.sink:
        return LocalCoreAttention
    return backend.core_attention


def attention_spec(
    cfg: ModelConfig, kind: AttentionType, backend: BackendModules, context_parallel: bool
) -> ModuleSpec:
    """``cp_comm_type`` matters only to Transformer Engine's core attention; mimo's ignores it."""
    geometry = AttentionGeometry.for_layer(cfg, kind)
    return ModuleSpec(
        module=MimoAttention,
        params={"attn_mask_type": AttnMaskType.causal, "geometry": geometry, "cp_comm_type": CP_COMM_TYPE},
        submodules=MimoAttentionSubmodules(
            linear_qkv=backend.provider.column_parallel_linear(),
            core_attention=core_attention_module(backend, geometry, context_parallel),
            linear_proj=backend.provider.row_parallel_linear(),
        ),
    )


def dense_mlp_spec(backend: BackendModules) -> ModuleSpec:
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(
            linear_fc1=backend.provider.column_parallel_linear(),
            linear_fc2=backend.provider.row_parallel_linear(),
        ),
    )


def moe_spec(cfg: ModelConfig, backend: BackendModules, use_te: bool) -> ModuleSpec:
    """megatron's MoE layer; router, expert bias and aux loss come from the TransformerConfig."""
    if cfg.moe_grouped_gemm and not use_te:
        raise ModelConfigError(
            "model.moe_grouped_gemm=true needs Transformer Engine's grouped GEMM; set it to false for the local"
            " (CPU) backend"
        )
    return get_moe_module_spec_for_backend(
        backend=backend.provider, num_experts=cfg.num_experts, moe_grouped_gemm=cfg.moe_grouped_gemm
    )


def transformer_layer_spec(
    cfg: ModelConfig, kind: AttentionType, moe: bool, use_te: bool, context_parallel: bool = False
) -> ModuleSpec:
    """One pre-norm layer: norm, attention of ``kind``, residual, norm, dense or MoE FFN, residual."""
    backend = backend_modules(use_te)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=backend.norm,
            self_attention=attention_spec(cfg, kind, backend, context_parallel),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=backend.norm,
            mlp=moe_spec(cfg, backend, use_te) if moe else dense_mlp_spec(backend),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def decoder_layer_specs(cfg: ModelConfig, use_te: bool, context_parallel: bool = False) -> list[ModuleSpec]:
    """Specs of all decoder layers, in order."""
    return [
        transformer_layer_spec(cfg, kind, cfg.is_moe(layer), use_te, context_parallel)
        for layer, kind in enumerate(cfg.layer_types())
    ]


def decoder_block_spec(
    cfg: ModelConfig, config: TransformerConfig, use_te: bool, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """The layers this pipeline (and virtual pipeline) stage builds, sliced with megatron's own stage split."""
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=decoder_layer_specs(cfg, use_te, config.context_parallel_size > 1)[offset : offset + count],
        layer_norm=backend_modules(use_te).norm,
    )


def mtp_layer_spec(cfg: ModelConfig, use_te: bool, context_parallel: bool = False) -> ModuleSpec:
    """One MTP block: enorm/hnorm, eh_proj over [embedding; hidden], a dense-FFN SWA layer, final norm.

    megatron's default MTP spec reuses the decoder's last layer (MoE here); MiMo's MTP layer is sliding-window
    with a sink and a dense FFN of the first layer's width.
    """
    backend = backend_modules(use_te)
    return ModuleSpec(
        module=MultiTokenPredictionLayer,
        submodules=MultiTokenPredictionLayerSubmodules(
            enorm=backend.norm,
            hnorm=backend.norm,
            eh_proj=backend.provider.column_parallel_linear(),
            transformer_layer=transformer_layer_spec(
                cfg, AttentionType.SLIDING, moe=False, use_te=use_te, context_parallel=context_parallel
            ),
            layer_norm=backend.norm,
        ),
    )


def mtp_block_spec(
    cfg: ModelConfig, config: TransformerConfig, use_te: bool, vp_stage: int | None = None
) -> MultiTokenPredictionBlockSubmodules | None:
    """The MTP blocks this stage builds (all of them on the last stage), or None."""
    if not cfg.mtp_num_layers:
        return None
    count = get_mtp_num_layers_to_build(config, vp_stage=vp_stage)
    if count == 0:
        return None
    offset = get_mtp_layer_offset(config, vp_stage=vp_stage)
    specs = [mtp_layer_spec(cfg, use_te, config.context_parallel_size > 1)] * cfg.mtp_num_layers
    return MultiTokenPredictionBlockSubmodules(layer_specs=specs[offset : offset + count])
