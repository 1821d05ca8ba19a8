"""build_model / transformer_config: one live TransformerConfig, and refusals with actionable messages."""

import dataclasses

import pytest
import torch
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlock, MultiTokenPredictionLayer
from megatron.core.transformer.transformer_layer import TransformerLayer

from mimo.model.attention import AttentionGeometry
from mimo.model.builder import build_model
from mimo.model.config import AttentionType, ModelConfig, ModelConfigError, PrecisionConfig
from mimo.model.core_attention import LocalCoreAttention
from mimo.model.specs import BackendModules, core_attention_module
from mimo.parallel.config import ParallelConfig
from mimo.recipes import load_config

SEQ = 32
BATCH = 2


@pytest.fixture(scope="module")
def tiny():
    return load_config().model


def test_modules_that_read_training_knobs_share_the_live_config(single_rank, tiny):
    """Routers (aux-loss coefficient), MoE layers and MTP read the config the training loop mutates; core
    attention holds a per-layer copy of static shape fields (as megatron's experts do)."""
    model = build_model(tiny, ParallelConfig(), PrecisionConfig(), seq_length=SEQ)[0]
    readers = (TopKRouter, MoELayer, MultiTokenPredictionBlock, MultiTokenPredictionLayer, TransformerLayer)
    modules = [module for module in model.modules() if isinstance(module, readers)]
    assert {type(module) for module in modules} == set(readers)
    assert all(module.config is model.config for module in modules)
    cores = [module for module in model.modules() if isinstance(module, LocalCoreAttention)]
    assert len(cores) == tiny.num_layers + tiny.mtp_num_layers
    assert all(core.config is not model.config for core in cores)


def mtp_and_router_grads(model, ids):
    model.zero_grad()
    model(ids, None, None, labels=ids).mean().backward()
    return (
        model.mtp.layers[0].eh_proj.weight.grad.clone(),
        model.decoder.layers[1].mlp.router.weight.grad.clone(),
    )


def test_training_knobs_changed_on_the_config_take_effect(single_rank, tiny):
    model = build_model(tiny, ParallelConfig(), PrecisionConfig(), seq_length=SEQ)[0].train()
    ids = torch.randint(0, tiny.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    mtp_grad, router_grad = mtp_and_router_grads(model, ids)
    model.config.mtp_loss_scaling_factor *= 2
    model.config.moe_aux_loss_coeff = 1.0
    doubled_mtp_grad, aux_router_grad = mtp_and_router_grads(model, ids)
    assert torch.allclose(doubled_mtp_grad, 2 * mtp_grad, rtol=1e-4, atol=1e-9)
    assert not torch.allclose(aux_router_grad, router_grad)


@pytest.mark.parametrize(
    "parallel, precision, seq, message",
    [
        (ParallelConfig(), PrecisionConfig(dtype="bf16", fp8="blockwise", fp8_backend="te"), SEQ, "fp8_backend"),
        (ParallelConfig(), PrecisionConfig(), 10**6, "max_position_embeddings"),
    ],
)
def test_unsupported_builds_are_refused(tiny, parallel, precision, seq, message):
    with pytest.raises(ModelConfigError, match=message):
        build_model(tiny, parallel, precision, seq_length=seq, use_te=False)


def test_layout_must_match_the_initialised_parallel_state(single_rank, tiny):
    with pytest.raises(RuntimeError, match="parallel state"):
        build_model(tiny, ParallelConfig(tp=2), PrecisionConfig(), seq_length=SEQ)


def test_grouped_gemm_needs_transformer_engine(single_rank, tiny):
    with pytest.raises(ValueError, match="moe_grouped_gemm"):
        build_model(
            dataclasses.replace(tiny, moe_grouped_gemm=True), ParallelConfig(), PrecisionConfig(), seq_length=SEQ
        )


def test_sink_layers_under_context_parallelism_use_mimo_attention_on_either_backend():
    """Transformer Engine cannot take a sink under tp 4 x cp 8 (its all-to-all mode splits the 8 KV heads over
    cp), so sink layers switch to mimo's all-gather attention whenever cp > 1; global layers keep the backend's."""

    class BackendAttention:  # stands in for TEDotProductAttention, which needs a GPU
        pass

    backend = BackendModules(provider=LocalSpecProvider(), norm=torch.nn.Identity, core_attention=BackendAttention)
    cfg = ModelConfig()
    sliding, full = (AttentionGeometry.for_layer(cfg, kind) for kind in (AttentionType.SLIDING, AttentionType.GLOBAL))
    assert sliding.sink and not full.sink
    assert core_attention_module(backend, sliding, context_parallel=True) is LocalCoreAttention
    assert core_attention_module(backend, sliding, context_parallel=False) is BackendAttention
    assert core_attention_module(backend, full, context_parallel=True) is BackendAttention
