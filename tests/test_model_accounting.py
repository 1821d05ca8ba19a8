"""Parameter and FLOP accounting against the spec sheet's arithmetic and against built models."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mimo.model.accounting import flops_per_token, mean_visible_keys, parameter_counts
from mimo.model.builder import build_model
from mimo.model.config import ModelConfig, PrecisionConfig
from mimo.parallel.config import ParallelConfig
from mimo.recipes import load_config

SEQ = 48
BATCH = 2


def recipe_model(name: str) -> ModelConfig:
    return load_config([f"model={name}"]).model


def test_full_model_matches_spec_arithmetic():
    """Spec sheet section 2, term by term."""
    counts = parameter_counts(recipe_model("mimo_v2_flash"))
    assert counts.embedding == counts.output_layer == 624_951_296
    assert counts.attention == 9 * 89_128_960 + 39 * 94_371_904 == 4_482_664_896
    assert counts.experts + counts.routers == 47 * 6_443_499_520 == 302_844_477_440
    assert counts.dense_mlp == 201_326_592
    assert counts.norms == 397_312
    assert counts.main == 308_778_768_832
    assert counts.mtp == 329_273_408
    assert counts.total == 309_108_042_240
    assert round(counts.active / 1e9, 2) == 15.45
    assert round(counts.active_excluding_embedding / 1e9, 2) == 14.82


def test_proxy_keeps_the_full_models_layer_shapes():
    full, proxy = recipe_model("mimo_v2_flash"), recipe_model("proxy")
    shape_keys = [
        "hidden_size",
        "vocab_size",
        "num_attention_heads",
        "num_key_value_heads",
        "swa_num_key_value_heads",
        "head_dim",
        "v_head_dim",
        "sliding_window",
        "ffn_hidden_size",
        "moe_ffn_hidden_size",
        "moe_router_topk",
    ]
    assert {k: getattr(proxy, k) for k in shape_keys} == {k: getattr(full, k) for k in shape_keys}
    assert parameter_counts(proxy).total == 3_355_697_344


@pytest.mark.parametrize("window", [0, 1, 5, 47, 100])
def test_mean_visible_keys_counts_the_attention_mask(window):
    query, key = torch.arange(SEQ).unsqueeze(1), torch.arange(SEQ).unsqueeze(0)
    causal = key <= query
    windowed = causal & (key >= query - window)
    assert mean_visible_keys(SEQ, None) == pytest.approx(causal.sum().item() / SEQ)
    assert mean_visible_keys(SEQ, window) == pytest.approx(windowed.sum().item() / SEQ)


TINY_VARIANTS = {
    "tiny_recipe": {},
    "ga_sinks_all_moe_no_mtp": dict(add_full_attention_sink_bias=True, num_dense_layers=0, mtp_num_layers=0),
    "moe_first_and_last": dict(moe_layer_pattern=[1, 0, 0, 1]),
    "dense_only_no_sinks_two_mtp": dict(
        num_dense_layers=4, add_swa_attention_sink_bias=False, mtp_num_layers=2, hybrid_layer_pattern=None
    ),
}


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_counts_equal_the_built_model(single_rank, variant):
    cfg = dataclasses.replace(recipe_model("tiny"), **TINY_VARIANTS[variant]).validate()
    model = build_model(cfg, ParallelConfig(), PrecisionConfig(), seq_length=SEQ)[0]
    counts = parameter_counts(cfg)
    assert sum(p.numel() for p in model.parameters()) == counts.total
    mtp_params = sum(p.numel() for p in model.mtp.parameters()) if cfg.mtp_num_layers else 0
    assert mtp_params == counts.mtp

    # Every matrix product outside the attention cores is what the accounting says: projections, dense FFN,
    # exactly top-k experts per token, routers, both LM-head passes, MTP blocks.
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, None, None, labels=ids)
    measured = counter.get_flop_counts()
    core = sum(sum(ops.values()) for name, ops in measured.items() if name.endswith("core_attention"))
    flops = flops_per_token(cfg, SEQ)
    expected = BATCH * SEQ * (flops.forward - flops.attention_scores - flops.mtp_attention_scores)
    assert sum(measured["Global"].values()) - core == expected
    assert flops.training == 3 * flops.forward
