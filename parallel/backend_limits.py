"""Layouts that are valid for the model but that the software underneath cannot run on this machine.

``validate_layout`` checks what any correct implementation needs. The rules here come from the communication
backend and the optimizer implementation in use, found when mimo ran every layout on CPU (gloo, torch's Adam):
they are refused before any process group exists, with the numbers and the change to make, instead of failing
inside megatron-core at the first MoE layer or the first checkpoint.
"""

from mimo.model.config import ModelConfig
from mimo.parallel.layout import LayoutError, ResolvedLayout

GLOO = "gloo"
FLEX_DISPATCHER = "flex"


def check_backend_support(layout: ResolvedLayout, model: ModelConfig, *, backend: str, fused_adam: bool) -> None:
    """Raise LayoutError for a layout that ``backend`` or the optimizer cannot run.

    ``fused_adam`` says whether Transformer Engine's or Apex's Adam is installed (megatron-core then never uses
    torch's Adam).
    """
    if backend == GLOO and layout.ep > 1 and layout.etp > 1:
        raise LayoutError(
            f"parallel.etp={layout.etp} with parallel.ep={layout.ep}: the experts' tensor-parallel ranks gather"
            " different numbers of routed tokens from each other, and the gloo backend (CPU) can only all-gather"
            " equal sizes. On CPU use parallel.etp=1 (or parallel.ep=1); NCCL runs this layout"
        )
    if backend == GLOO and model.moe_token_dispatcher == FLEX_DISPATCHER and model.num_moe_layers:
        raise LayoutError(
            "model.moe_token_dispatcher=flex is megatron-core's DeepEP/HybridEP dispatcher, which runs on GPUs only;"
            " on CPU (gloo) use model.moe_token_dispatcher=alltoall or allgather"
        )
    if not fused_adam and model.num_moe_layers:
        _check_every_stage_has_experts(layout, model)


def _check_every_stage_has_experts(layout: ResolvedLayout, model: ModelConfig) -> None:
    """Each pipeline rank's layers (all its virtual stages) must include a MoE layer; the dense and MoE layers may
    lie anywhere, so every rank's actual layers are looked at."""
    moe_layers = model.moe_layers()
    for stage in range(layout.pp):
        layers = layout.rank_layers(stage)
        if any(model.is_moe(layer) for layer in layers):
            continue
        if stage == 0 and layout.vpp is None:
            fix = f"at least {moe_layers[0] + 1} layers on the first stage (parallel.pipeline_first_stage_layers)"
        else:
            fix = "another split (parallel.pipeline_first_stage_layers / pipeline_last_stage_layers, parallel.vpp)"
        raise LayoutError(
            f"pipeline stage {stage} holds only dense layers {layers} (the MoE layers are {moe_layers}) and so no"
            " expert parameters; without Transformer Engine or Apex, megatron-core 0.16.1 cannot checkpoint the"
            f" empty expert optimizer such a stage has. Give every stage a MoE layer: {fix}, or fewer pipeline"
            " stages"
        )
