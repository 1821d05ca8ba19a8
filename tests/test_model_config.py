"""ModelConfig / PrecisionConfig validation, derived helpers, and the HF config mapping."""

import dataclasses

import pytest
from transformers import MiMoV2FlashConfig

from mimo.model.config import AttentionType, ModelConfig, ModelConfigError, PrecisionConfig
from mimo.model.hf.configs import hf_config_to_mimo, mimo_config_to_hf
from mimo.model.hf.mapping import HFMappingError
from mimo.recipes import load_config


def full_model() -> ModelConfig:
    return load_config(["model=mimo_v2_flash"]).model


def test_released_layer_pattern_and_derived_helpers():
    cfg = full_model()
    global_layers = [i for i, kind in enumerate(cfg.layer_types()) if kind is AttentionType.GLOBAL]
    assert global_layers == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    assert cfg.rotary_dim == 64
    assert [cfg.is_moe(i) for i in (0, 1, 47)] == [False, True, True]
    assert cfg.num_kv_heads(AttentionType.GLOBAL) == 4 and cfg.num_kv_heads(AttentionType.SLIDING) == 8
    assert cfg.window(AttentionType.SLIDING) == 128 and cfg.window(AttentionType.GLOBAL) is None
    assert cfg.has_sink(AttentionType.SLIDING) and not cfg.has_sink(AttentionType.GLOBAL)
    assert cfg.rope_base(AttentionType.GLOBAL) == 640_000.0 and cfg.rope_base(AttentionType.SLIDING) == 10_000.0
    # The pattern agrees with transformers' own default rule.
    assert [kind.value for kind in cfg.layer_types()] == MiMoV2FlashConfig().layer_types


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(hybrid_layer_pattern=[0, 1, 1]), "hybrid_layer_pattern"),
        (dict(hybrid_layer_pattern=[0, 1, 2, 1]), "hybrid_layer_pattern"),
        (dict(moe_router_topk=9), "moe_router_topk"),
        (dict(moe_router_topk=0), "moe_router_topk"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(swa_num_key_value_heads=3), "swa_num_key_value_heads"),
        (dict(head_dim=192, partial_rotary_factor=0.3333), "partial_rotary_factor"),
        (dict(partial_rotary_factor=0.01), "partial_rotary_factor"),
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
        (dict(num_dense_layers=5), "num_dense_layers"),
        (dict(num_dense_layers=-1), "num_dense_layers"),
        (dict(moe_token_dispatcher="ring"), "moe_token_dispatcher"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(num_experts=0), "num_experts"),
        (dict(mtp_num_layers=-1), "mtp_num_layers"),
        (dict(init_method_std=0.0), "init_method_std"),
        (dict(untie_embeddings_and_output_weights=False), "untie_embeddings_and_output_weights"),
    ],
)
def test_invalid_model_configs_name_the_key(change, key):
    with pytest.raises(ModelConfigError, match=f"model.{key}"):
        dataclasses.replace(ModelConfig(), **change).validate()


def test_all_dense_model_needs_no_experts():
    ModelConfig(num_dense_layers=4, num_experts=0, moe_router_topk=0).validate()


@pytest.mark.parametrize(
    "precision, key",
    [
        (PrecisionConfig(dtype="fp16"), "precision.dtype"),
        (PrecisionConfig(fp8="tensorwise"), "precision.fp8"),
        (PrecisionConfig(dtype="fp32", fp8="blockwise"), "precision.fp8"),
    ],
)
def test_invalid_precision(precision, key):
    with pytest.raises(ModelConfigError, match=key):
        precision.validate()


def test_recipes_are_valid():
    for name in ("tiny", "mimo_v2_flash", "proxy"):
        load_config([f"model={name}"]).model.validate()


def test_hf_config_round_trip_and_window_convention():
    cfg = full_model()
    hf = MiMoV2FlashConfig(**mimo_config_to_hf(cfg))
    assert hf.sliding_window == 129  # transformers counts the query itself
    assert [t == "sliding_attention" for t in hf.layer_types] == [bool(v) for v in cfg.layer_pattern()]
    assert hf_config_to_mimo(hf, base=cfg) == dataclasses.replace(cfg, hybrid_layer_pattern=cfg.layer_pattern())


def test_hub_config_keys_go_through_transformers():
    """A raw Hub config uses sliding_window_size (128): transformers turns it into 129, mimo back into 128."""
    hf = hf_config_to_mimo({"sliding_window_size": 128, "num_hidden_layers": 48})
    assert hf.sliding_window == 128 and hf.swa_num_key_value_heads == 8


def test_hf_cannot_express_other_kv_ratios_or_sinks():
    with pytest.raises(HFMappingError, match="swa_num_key_value_heads"):
        mimo_config_to_hf(ModelConfig(num_key_value_heads=4, swa_num_key_value_heads=4))
    with pytest.raises(HFMappingError, match="sink"):
        mimo_config_to_hf(ModelConfig(add_full_attention_sink_bias=True))
    with pytest.raises(HFMappingError, match="routed_scaling_factor"):
        hf_config_to_mimo(MiMoV2FlashConfig(routed_scaling_factor=2.5))
