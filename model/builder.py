"""Turns the mimo configs into megatron-core objects: the TransformerConfig and the model chunks of this rank.

The TransformerConfig is one object shared by the modules of every chunk (megatron's expert MLPs and mimo's core
attention hold copies with static shape fields changed). The training loop changes three of its fields while
running (``mtp_loss_scaling_factor``, ``moe_router_bias_update_rate``, ``moe_aux_loss_coeff``) and megatron-core
0.16.1 reads each of them from that shared object at run time: GPTModel for the MTP loss scale, the router for the
aux-loss coefficient, ``finalize_model_grads`` for the bias update. (MultiTokenPredictionBlock copies
``mtp_loss_scaling_factor`` into an attribute at construction but never reads that copy.)
"""

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_moe_layer_wise_logging_tracker
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, MTPLossLoggingHelper
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal

from mimo.model.config import ModelConfig, ModelConfigError, PrecisionConfig
from mimo.model.gpt import MimoGPTModel
from mimo.model.init import initialize_weights
from mimo.model.precision import PrecisionPlan, precision_plan
from mimo.model.specs import backend_modules, decoder_block_spec, mtp_block_spec
from mimo.parallel.config import ParallelConfig

PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROUTER_DTYPE = "fp32"
ROUTER_SCORE = "sigmoid"
LOAD_BALANCING = "seq_aux_loss"


def transformer_config(
    model_cfg: ModelConfig, parallel_cfg: ParallelConfig, precision: PrecisionConfig, plan: PrecisionPlan
) -> TransformerConfig:
    """The megatron TransformerConfig of a MiMo model under a parallel layout and precision.

    ``num_query_groups`` holds the GA layers' KV heads; each attention layer overrides it for its own type.
    Initialisation is normal(0, init_method_std) for every weight, output projections included (MiMo uses no
    depth-scaled init). megatron's ``fp8`` switch (TE's FP8 autocast around every layer) is on only when
    Transformer Engine runs the plan's FP8 GEMMs; emulated FP8 lives in the modules the specs pick.
    """
    model_cfg.validate()
    precision.validate()
    dtype = PARAM_DTYPES[precision.dtype]
    init = init_method_normal(model_cfg.init_method_std)
    moe = model_cfg.num_moe_layers > 0
    tp = parallel_cfg.tp
    moe_kwargs = (
        dict(
            num_moe_experts=model_cfg.num_experts,
            moe_ffn_hidden_size=model_cfg.moe_ffn_hidden_size,
            moe_router_topk=model_cfg.moe_router_topk,
            moe_router_score_function=ROUTER_SCORE,
            moe_router_enable_expert_bias=True,
            moe_router_bias_update_rate=model_cfg.moe_router_bias_update_rate,
            moe_router_load_balancing_type=LOAD_BALANCING,
            moe_aux_loss_coeff=model_cfg.moe_aux_loss_coeff,
            moe_router_dtype=ROUTER_DTYPE,
            moe_token_dispatcher_type=model_cfg.moe_token_dispatcher,
            moe_grouped_gemm=model_cfg.moe_grouped_gemm,
            moe_layer_freq=model_cfg.moe_pattern(),
        )
        if moe
        else {}
    )
    fp8_kwargs = dict(fp8=plan.fp8.element_format.lower(), fp8_recipe=plan.fp8.recipe) if plan.te_fp8 else {}
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_key_value_heads,
        kv_channels=model_cfg.head_dim,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.layernorm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        softmax_scale=1.0 / math.sqrt(model_cfg.head_dim),
        init_method_std=model_cfg.init_method_std,
        init_method=init,
        output_layer_init_method=init,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision.dtype == "bf16",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_cfg.pp,
        virtual_pipeline_model_parallel_size=parallel_cfg.vpp,
        context_parallel_size=parallel_cfg.cp,
        expert_model_parallel_size=parallel_cfg.ep,
        expert_tensor_parallel_size=parallel_cfg.etp,
        sequence_parallel=tp > 1 if parallel_cfg.sequence_parallel is None else parallel_cfg.sequence_parallel,
        num_layers_in_first_pipeline_stage=parallel_cfg.pipeline_first_stage_layers,
        num_layers_in_last_pipeline_stage=parallel_cfg.pipeline_last_stage_layers,
        # Separate isend/irecv calls, never one batch_isend_irecv: with two pipeline stages and interleaving, a
        # rank's previous and next stage are the same rank, and a batch then posts an activation and a gradient
        # of the same shape to that rank on one communicator, where sends and receives pair up in posting order
        # and the two tensors get swapped. The unbatched path sends the two directions on two communicators.
        batch_p2p_comm=False,
        # megatron's default ("full") is its own deprecated spelling of "the whole layer" and warns on every build.
        cuda_graph_scope=[],
        overlap_p2p_comm=parallel_cfg.vpp is not None,
        # Every layer keeps checkpoint keys of its own (decoder.layers.N.*): GA and SWA layers differ in shape and
        # dense and MoE layers in tensors, so megatron's stacking of a homogeneous block's layers into one tensor
        # per name (which its list moe_layer_freq already turns off when a model has MoE layers) cannot hold them.
        hetereogenous_dist_checkpoint=True,
        use_cpu_initialization=not torch.cuda.is_available(),
        mtp_num_layers=model_cfg.mtp_num_layers or None,
        mtp_loss_scaling_factor=model_cfg.mtp_loss_weight,
        recompute_granularity=model_cfg.recompute_granularity,
        recompute_method=model_cfg.recompute_method,
        recompute_num_layers=model_cfg.recompute_num_layers,
        **({"recompute_modules": list(model_cfg.recompute_modules)} if model_cfg.recompute_modules else {}),
        **moe_kwargs,
        **fp8_kwargs,
    )


def resolve_use_te(use_te: bool | None) -> bool:
    """None picks Transformer Engine exactly when it is importable and a GPU is present."""
    if use_te is None:
        return HAVE_TE and torch.cuda.is_available()
    return use_te


def run_precision_plan(precision: PrecisionConfig, use_te: bool | None = None) -> PrecisionPlan:
    """The precision plan ``build_model`` follows for the same arguments (for the start-up log)."""
    return precision_plan(precision, resolve_use_te(use_te))


def build_model(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    precision: PrecisionConfig,
    *,
    seq_length: int,
    use_te: bool | None = None,
    seed: int | None = None,
    random_init: bool = True,
) -> list[GPTModel]:
    """This rank's model chunks, one per virtual pipeline stage (a list of one without interleaving).

    megatron's parallel state must already be initialised with the layout of ``parallel_cfg``
    (``mimo.parallel.runtime.initialize``). All chunks share one TransformerConfig (``chunks[0].config``).
    With a ``seed`` the initial weights are a function of it alone, the same under every parallel layout
    (``mimo.model.init``); without one they are megatron's draw from this process's random state. With
    ``random_init=False`` nothing is drawn (megatron's ``perform_initialization=False``, ``seed`` unused): the
    weights are left uninitialised for a caller that loads every tensor next (conversion).
    """
    if seq_length > model_cfg.max_position_embeddings:
        raise ModelConfigError(
            f"seq_length={seq_length} exceeds model.max_position_embeddings={model_cfg.max_position_embeddings};"
            " shorten the sequences or raise model.max_position_embeddings"
        )
    use_te = resolve_use_te(use_te)
    plan = precision_plan(precision, use_te)
    backend = backend_modules(use_te, plan)
    _check_parallel_state(parallel_cfg)
    _reset_loss_trackers()
    config = transformer_config(model_cfg, parallel_cfg, precision, plan)
    config.perform_initialization = random_init
    stages = range(parallel_cfg.vpp) if parallel_cfg.vpp else [None]
    chunks = [
        MimoGPTModel(
            config=config,
            transformer_layer_spec=decoder_block_spec(
                model_cfg, config, backend, vp_stage, parallel_cfg.cp_window_exchange
            ),
            vocab_size=model_cfg.vocab_size,
            max_sequence_length=seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=False,
            position_embedding_type="none",
            mtp_block_spec=mtp_block_spec(model_cfg, config, backend, vp_stage, parallel_cfg.cp_window_exchange),
            vp_stage=vp_stage,
        )
        for vp_stage in stages
    ]
    _mark_expert_parameters(chunks)
    if seed is not None and random_init:
        initialize_weights(chunks, seed)
    return chunks


def _mark_expert_parameters(chunks: list[GPTModel]) -> None:
    """Put every routed-expert weight in megatron's expert gradient buffers and expert optimizer, whatever ep.

    megatron-core 0.16.1 marks expert weights (``allreduce=False``) only when ep > 1, and otherwise reduces their
    gradients like dense weights, over the dense data-parallel group. That group is the experts' replica group
    only when etp == tp. With etp < tp (mimo's default etp=1 under tensor parallelism) every tensor-parallel rank
    also holds whole experts and, under sequence parallelism, routes its own tokens through them: their gradients
    must be summed over the expert-data-parallel group (world / (etp * ep * pp) ranks), which the expert buffers
    do. Marking them always also keeps the optimizer's structure the same on every layout.
    """
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, MoELayer):
                for param in module.experts.parameters():
                    param.allreduce = False


def _reset_loss_trackers() -> None:
    """megatron keeps its MTP and MoE loss-logging trackers and auxiliary-loss scales as process globals, shaped
    by the first model that uses them; a process that builds another model (tests, conversion, evaluation) must
    start them afresh."""
    MTPLossLoggingHelper.tracker.clear()
    get_moe_layer_wise_logging_tracker().clear()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    MTPLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)  # megatron's own initial value


def _check_parallel_state(parallel_cfg: ParallelConfig) -> None:
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron's parallel state is not initialised; call mimo.parallel.runtime.initialize(...) before"
            " build_model"
        )
    actual = {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        "ep": parallel_state.get_expert_model_parallel_world_size(),
        "etp": parallel_state.get_expert_tensor_parallel_world_size(),
        "cp": parallel_state.get_context_parallel_world_size(),
    }
    wanted = {key: getattr(parallel_cfg, key) for key in actual}
    if actual != wanted:
        raise RuntimeError(
            f"megatron's parallel state was initialised with {actual} but parallel config asks for {wanted};"
            " initialise with the same ParallelConfig"
        )
