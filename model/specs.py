"""Layer specs of the MiMo decoder and its MTP block, for the local backend and for Transformer Engine.

``backend_modules`` is the one place that picks implementations, and every linear is picked per GEMM from the
precision plan (``mimo.model.precision``): the backend's own module, mimo's emulated-FP8 module, or (in a
Transformer Engine FP8 run) the backend's module kept out of FP8. Both backends keep the norms as separate
modules (no layernorm fused into the next linear, no key remapping) and name the sink
``core_attention.softmax_offset``, so a checkpoint has the same keys whichever backend and precision wrote it, and
one HF mapping serves both. The Transformer Engine path is written against megatron-core 0.16.1's TE wrappers but
is not exercised on the CPU machines this code is tested on.
"""

from dataclasses import dataclass

from megatron.core.extensions.transformer_engine import HAVE_TE, TEDotProductAttention, TENorm
from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
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
from mimo.model.config import AttentionType, ModelConfig, ModelConfigError, PrecisionConfig
from mimo.model.core_attention import LocalCoreAttention
from mimo.model.fp8_modules import (
    Fp8EmulatedColumnParallelLinear,
    Fp8EmulatedRowParallelLinear,
    outside_fp8_autocast,
)
from mimo.model.norm import RMSNorm
from mimo.model.precision import Gemm, PrecisionPlan, precision_plan
from mimo.parallel.config import ALLGATHER, HALO

NO_FP8 = precision_plan(PrecisionConfig(), use_te=False)


@dataclass(frozen=True)
class BackendModules:
    """The implementations one backend contributes to every spec, and the precision plan they follow."""

    provider: BackendSpecProvider
    """megatron's own choice of linears and expert modules for the backend."""
    norm: type
    core_attention: type
    plan: PrecisionPlan = NO_FP8

    def column_parallel_linear(self, gemm: Gemm) -> type | ModuleSpec:
        return self._planned(gemm, self.provider.column_parallel_linear(), Fp8EmulatedColumnParallelLinear)

    def row_parallel_linear(self, gemm: Gemm) -> type | ModuleSpec:
        return self._planned(gemm, self.provider.row_parallel_linear(), Fp8EmulatedRowParallelLinear)

    def experts(self, grouped_gemm: bool) -> ModuleSpec:
        """The routed experts: the backend's expert module with planned linears."""
        if grouped_gemm and isinstance(self.provider, LocalSpecProvider):
            raise ModelConfigError(
                "model.moe_grouped_gemm=true needs Transformer Engine's grouped GEMM; set it to false for the local"
                " (CPU) backend"
            )
        if grouped_gemm and self.plan.emulated and self.plan.scaling(Gemm.EXPERT_FFN):
            raise ModelConfigError(
                "model.moe_grouped_gemm=true with emulated FP8: the emulation runs each expert's GEMMs on their own"
                " (megatron's SequentialMLP); set model.moe_grouped_gemm=false"
            )
        module, linears = self.provider.grouped_mlp_modules(grouped_gemm, False)
        return ModuleSpec(
            module=module,
            submodules=MLPSubmodules(
                linear_fc1=self._planned(Gemm.EXPERT_FFN, linears.linear_fc1, Fp8EmulatedColumnParallelLinear),
                activation_func=self.provider.activation_func(),
                linear_fc2=self._planned(Gemm.EXPERT_FFN, linears.linear_fc2, Fp8EmulatedRowParallelLinear),
            ),
        )

    def _planned(self, gemm: Gemm, module: type, emulated: type) -> type | ModuleSpec:
        """The module of ``gemm``: emulated FP8, the backend's module outside TE's FP8 autocast, or as it is."""
        scaling = self.plan.scaling(gemm)
        if scaling is not None and self.plan.emulated:
            return ModuleSpec(module=emulated, params={"fp8": scaling})
        if scaling is None and self.plan.te_fp8:
            return outside_fp8_autocast(module)
        return module


def backend_modules(use_te: bool, plan: PrecisionPlan = NO_FP8) -> BackendModules:
    """Transformer Engine (GPU) or local modules (CPU, or GPU without TE), with the linears ``plan`` asks for."""
    if use_te:
        if not HAVE_TE:
            raise ModelConfigError(
                'Transformer Engine was asked for but is not importable; install it (pip install -e ".[gpu]") or'
                " run on the local backend"
            )
        return BackendModules(provider=TESpecProvider(), norm=TENorm, core_attention=TEDotProductAttention, plan=plan)
    return BackendModules(provider=LocalSpecProvider(), norm=RMSNorm, core_attention=LocalCoreAttention, plan=plan)


TE_CP_COMM_TYPE = "p2p"
"""Transformer Engine's context parallelism for layers without a sink or window: a ring passing key/value
chunks."""


def core_attention_module(backend: BackendModules, geometry: AttentionGeometry, context_parallel: bool) -> type:
    """Under context parallelism, sliding-window layers and layers with a sink run mimo's core attention on either
    backend.

    Transformer Engine takes a sink under context parallelism only in its all-to-all mode, which splits heads
    over the context-parallel ranks: tp * cp would have to divide the 8 KV heads, which rules out the long-context
    layouts (tp 4, cp 8). mimo's core attention is exact for sinks and windows under any cp and needs only the
    ``window`` keys before each chunk on sliding-window layers (``parallel.cp_window_exchange``); their
    O(s * window) attention is a small share of the step next to the global layers (which keep Transformer
    Engine's ring).
    """
    if context_parallel and (geometry.sink or geometry.window is not None):
        return LocalCoreAttention
    return backend.core_attention


def cp_comm_type(core_attention: type, geometry: AttentionGeometry, window_exchange: str | None) -> str:
    """How a layer's core attention exchanges keys and values under context parallelism: Transformer Engine's
    ring, or in mimo's attention the window's halo (sliding-window layers, unless ``window_exchange`` asks for
    an all-gather) or an all-gather."""
    if core_attention is not LocalCoreAttention:
        return TE_CP_COMM_TYPE
    return HALO if geometry.window is not None and window_exchange == HALO else ALLGATHER


def attention_spec(
    cfg: ModelConfig, kind: AttentionType, backend: BackendModules, window_exchange: str | None
) -> ModuleSpec:
    """``window_exchange``: ``parallel.cp_window_exchange`` under context parallelism, None without."""
    geometry = AttentionGeometry.for_layer(cfg, kind)
    core_attention = core_attention_module(backend, geometry, window_exchange is not None)
    return ModuleSpec(
        module=MimoAttention,
        params={
            "attn_mask_type": AttnMaskType.causal,
            "geometry": geometry,
            "cp_comm_type": cp_comm_type(core_attention, geometry, window_exchange),
        },
        submodules=MimoAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(Gemm.QKV),
            core_attention=core_attention,
            linear_proj=backend.row_parallel_linear(Gemm.OUT_PROJ),
        ),
    )


def dense_mlp_spec(backend: BackendModules) -> ModuleSpec:
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(
            linear_fc1=backend.column_parallel_linear(Gemm.DENSE_FFN),
            linear_fc2=backend.row_parallel_linear(Gemm.DENSE_FFN),
        ),
    )


def moe_spec(cfg: ModelConfig, backend: BackendModules) -> ModuleSpec:
    """megatron's MoE layer (no shared experts); router, expert bias and aux loss come from the TransformerConfig."""
    return ModuleSpec(
        module=MoELayer,
        submodules=MoESubmodules(experts=backend.experts(cfg.moe_grouped_gemm)),
        metainfo={"fuse_pre_mlp_layernorm": False},
    )


def transformer_layer_spec(
    cfg: ModelConfig, kind: AttentionType, moe: bool, backend: BackendModules, window_exchange: str | None = None
) -> ModuleSpec:
    """One pre-norm layer: norm, attention of ``kind``, residual, norm, dense or MoE FFN, residual.
    ``window_exchange``: as in ``attention_spec``."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=backend.norm,
            self_attention=attention_spec(cfg, kind, backend, window_exchange),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=backend.norm,
            mlp=moe_spec(cfg, backend) if moe else dense_mlp_spec(backend),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def decoder_layer_specs(
    cfg: ModelConfig, backend: BackendModules, window_exchange: str | None = None
) -> list[ModuleSpec]:
    """Specs of all decoder layers, in order."""
    return [
        transformer_layer_spec(cfg, kind, cfg.is_moe(layer), backend, window_exchange)
        for layer, kind in enumerate(cfg.layer_types())
    ]


def _window_exchange(config: TransformerConfig, cp_window_exchange: str) -> str | None:
    return cp_window_exchange if config.context_parallel_size > 1 else None


def decoder_block_spec(
    cfg: ModelConfig,
    config: TransformerConfig,
    backend: BackendModules,
    vp_stage: int | None = None,
    cp_window_exchange: str = HALO,
) -> TransformerBlockSubmodules:
    """The layers this pipeline (and virtual pipeline) stage builds, sliced with megatron's own stage split.
    ``cp_window_exchange``: ``parallel.cp_window_exchange``, used under context parallelism."""
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    layer_specs = decoder_layer_specs(cfg, backend, _window_exchange(config, cp_window_exchange))
    return TransformerBlockSubmodules(layer_specs=layer_specs[offset : offset + count], layer_norm=backend.norm)


def mtp_layer_spec(cfg: ModelConfig, backend: BackendModules, window_exchange: str | None = None) -> ModuleSpec:
    """One MTP block: enorm/hnorm, eh_proj over [embedding; hidden], a dense-FFN SWA layer, final norm.

    megatron's default MTP spec reuses the decoder's last layer (MoE here); MiMo's MTP layer is sliding-window
    with a sink and a dense FFN of the first layer's width.
    """
    return ModuleSpec(
        module=MultiTokenPredictionLayer,
        submodules=MultiTokenPredictionLayerSubmodules(
            enorm=backend.norm,
            hnorm=backend.norm,
            eh_proj=backend.column_parallel_linear(Gemm.MTP_PROJ),
            transformer_layer=transformer_layer_spec(
                cfg, AttentionType.SLIDING, moe=False, backend=backend, window_exchange=window_exchange
            ),
            layer_norm=backend.norm,
        ),
    )


def mtp_block_spec(
    cfg: ModelConfig,
    config: TransformerConfig,
    backend: BackendModules,
    vp_stage: int | None = None,
    cp_window_exchange: str = HALO,
) -> MultiTokenPredictionBlockSubmodules | None:
    """The MTP blocks this stage builds (all of them on the last stage), or None. ``cp_window_exchange``: as in
    ``decoder_block_spec``."""
    if not cfg.mtp_num_layers:
        return None
    count = get_mtp_num_layers_to_build(config, vp_stage=vp_stage)
    if count == 0:
        return None
    offset = get_mtp_layer_offset(config, vp_stage=vp_stage)
    specs = [mtp_layer_spec(cfg, backend, _window_exchange(config, cp_window_exchange))] * cfg.mtp_num_layers
    return MultiTokenPredictionBlockSubmodules(layer_specs=specs[offset : offset + count])
