"""Config translation between mimo's ModelConfig and Hugging Face MiMo-V2-Flash configs, both spellings:
transformers' ``MiMoV2FlashConfig`` keys and the Hub's original remote-code keys (``hybrid_layer_pattern``,
``moe_layer_freq``, ``rope_theta``/``swa_rope_theta``, ...)."""

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mimo.model.config import AttentionType, ModelConfig, moe_pattern_fields
from mimo.model.hf.mapping import HFMappingError

CONFIG_FILE = "config.json"
HF_DEFAULT_ROPE_TYPE = "default"
HF_DENSE, HF_SPARSE = "dense", "sparse"
# Hub (remote-code) spelling of config.json -> transformers' MiMoV2FlashConfig spelling.
HUB_LAYER_PATTERN, HUB_MOE_FREQ = "hybrid_layer_pattern", "moe_layer_freq"
HUB_RENAMED = {"layernorm_epsilon": "rms_norm_eps"}
HUB_DROPPED = ("auto_map", "attention_chunk_size", "topk_method", "swa_qk_head_dim")
"""Hub keys with no meaning for the architecture (remote code, inference kernels)."""
HUB_DEFAULT_ROPE = {"rope_theta": 5_000_000.0, "swa_rope_theta": 10_000.0, "partial_rotary_factor": 0.334}
"""Values the Hub's remote code assumes when config.json leaves a RoPE key out."""


def read_hf_config(directory: Path):
    """The ``MiMoV2FlashConfig`` of a checkpoint directory, whether config.json uses transformers' keys or the
    Hub's original ones (``hybrid_layer_pattern``, ``moe_layer_freq``, ``rope_theta``/``swa_rope_theta``,
    ``swa_num_key_value_heads``, ...)."""
    from transformers import MiMoV2FlashConfig

    path = Path(directory) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise HFMappingError(f"cannot read {path}: {err}; point at a Hugging Face MiMo-V2-Flash directory") from err
    return MiMoV2FlashConfig(**_transformers_spelling(raw, path))


def _transformers_spelling(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    if HUB_LAYER_PATTERN not in raw:
        return raw
    kwargs = {HUB_RENAMED.get(key, key): value for key, value in raw.items() if key not in HUB_DROPPED}
    _check_hub_only_keys(kwargs, path)
    kwargs["layer_types"] = [
        (AttentionType.SLIDING if value else AttentionType.GLOBAL).value for value in kwargs.pop(HUB_LAYER_PATTERN)
    ]
    if HUB_MOE_FREQ in kwargs:
        kwargs["mlp_layer_types"] = ["sparse" if value else "dense" for value in kwargs.pop(HUB_MOE_FREQ)]
    if kwargs.get("routed_scaling_factor") is None:
        kwargs["routed_scaling_factor"] = 1.0  # the Hub writes null for "no rescaling"
    rope = {key: kwargs.pop(key, default) for key, default in HUB_DEFAULT_ROPE.items()}
    kwargs.setdefault(
        "rope_parameters",
        {
            kind.value: {
                "rope_type": "default",
                "rope_theta": rope["swa_rope_theta" if kind is AttentionType.SLIDING else "rope_theta"],
                "partial_rotary_factor": rope["partial_rotary_factor"],
            }
            for kind in AttentionType
        },
    )
    return kwargs


def _check_hub_only_keys(kwargs: dict[str, Any], path: Path) -> None:
    """Hub keys that transformers' port (and mimo) fix to one value: consume them, refusing any other value."""
    allowed = {
        "swa_num_key_value_heads": (2 * kwargs.get("num_key_value_heads", 0),),
        "swa_num_attention_heads": (kwargs.get("num_attention_heads"),),
        "swa_head_dim": (kwargs.get("head_dim"),),
        "swa_v_head_dim": (kwargs.get("v_head_dim"),),
        "add_swa_attention_sink_bias": (True,),
        "add_full_attention_sink_bias": (False,),
        "n_shared_experts": (0, None),
        "scoring_func": ("sigmoid",),
        "rope_scaling": (None,),
    }
    wrong = []
    for key, values in allowed.items():
        if key in kwargs and (value := kwargs.pop(key)) not in values:
            wrong.append(f"{key}={value!r} (supported: {' or '.join(map(repr, values))})")
    if wrong:
        raise HFMappingError(f"{path}: settings mimo's MiMo-V2-Flash does not support: {'; '.join(wrong)}")


def mimo_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of transformers' ``MiMoV2FlashConfig`` describing the same architecture.

    transformers derives the SWA KV heads as twice the GA ones and puts sinks on exactly the SWA layers, so other
    combinations have no HF equivalent. ``initializer_range`` carries mimo's init std.
    """
    cfg.validate()
    if cfg.swa_num_key_value_heads != 2 * cfg.num_key_value_heads:
        raise HFMappingError(
            f"model.swa_num_key_value_heads={cfg.swa_num_key_value_heads} is not 2 * model.num_key_value_heads"
            f" ({cfg.num_key_value_heads}); transformers' MiMo-V2-Flash fixes SWA KV heads at twice the GA ones"
        )
    if not cfg.add_swa_attention_sink_bias or cfg.add_full_attention_sink_bias:
        raise HFMappingError(
            "transformers' MiMo-V2-Flash has sinks on exactly the SWA layers; set"
            " model.add_swa_attention_sink_bias=true and model.add_full_attention_sink_bias=false"
        )

    def rope(kind: AttentionType) -> dict[str, Any]:
        return {
            "rope_type": HF_DEFAULT_ROPE_TYPE,
            "rope_theta": cfg.rope_base(kind),
            "partial_rotary_factor": cfg.partial_rotary_factor,
        }

    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        v_head_dim=cfg.v_head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.init_method_std,
        rms_norm_eps=cfg.layernorm_epsilon,
        tie_word_embeddings=False,
        rope_parameters={kind.value: rope(kind) for kind in AttentionType},
        attention_bias=False,
        attention_dropout=0.0,
        moe_intermediate_size=cfg.moe_ffn_hidden_size,
        num_experts_per_tok=cfg.moe_router_topk,
        n_routed_experts=cfg.num_experts,
        routed_scaling_factor=1.0,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        sliding_window=cfg.sliding_window + 1,
        layer_types=[kind.value for kind in cfg.layer_types()],
        mlp_layer_types=[HF_SPARSE if cfg.is_moe(i) else HF_DENSE for i in range(cfg.num_layers)],
        attention_value_scale=cfg.attention_value_scale,
    )


def hf_config_to_mimo(hf_config: Mapping[str, Any] | Any, base: ModelConfig | None = None) -> ModelConfig:
    """The mimo ModelConfig of an HF MiMo-V2-Flash config (a ``MiMoV2FlashConfig`` or its keyword arguments).

    The architecture comes from HF; training-only settings (MTP blocks and loss weight, MoE balancing, dispatcher,
    init std, name) come from ``base``: HF configs do not carry them, and the Hub's initializer_range (0.02) is a
    library default, not the 0.006 MiMo was trained with. Without a ``base`` those come from ModelConfig's defaults.
    """
    if isinstance(hf_config, Mapping):
        from transformers import MiMoV2FlashConfig

        hf_config = MiMoV2FlashConfig(**hf_config)
    mlp_types = list(hf_config.mlp_layer_types)
    if set(mlp_types) - {HF_DENSE, HF_SPARSE}:
        raise HFMappingError(f"mlp_layer_types={mlp_types}: every entry must be {HF_DENSE!r} or {HF_SPARSE!r}")
    ropes = hf_config.rope_parameters
    kinds = {kind.value for kind in AttentionType}
    if set(ropes) != kinds or any(
        ropes[k].get("rope_type", HF_DEFAULT_ROPE_TYPE) != HF_DEFAULT_ROPE_TYPE for k in kinds
    ):
        raise HFMappingError(f"rope_parameters={ropes}: mimo supports plain RoPE ('default') for both layer types")
    factors = {ropes[k]["partial_rotary_factor"] for k in kinds}
    if len(factors) != 1:
        raise HFMappingError(f"rope_parameters={ropes}: mimo needs one partial_rotary_factor for both layer types")
    unsupported = {
        "routed_scaling_factor": (hf_config.routed_scaling_factor, 1.0),
        "n_group": (hf_config.n_group, 1),
        "topk_group": (hf_config.topk_group, 1),
        "norm_topk_prob": (hf_config.norm_topk_prob, True),
        "tie_word_embeddings": (hf_config.tie_word_embeddings, False),
        "attention_bias": (hf_config.attention_bias, False),
        "hidden_act": (hf_config.hidden_act, "silu"),
    }
    for key, (value, wanted) in unsupported.items():
        if value != wanted:
            raise HFMappingError(f"HF config {key}={value}: mimo's MiMo-V2-Flash supports only {wanted}")
    value_scale = hf_config.attention_value_scale
    return dataclasses.replace(
        base or ModelConfig(),
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        vocab_size=hf_config.vocab_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_key_value_heads=hf_config.num_key_value_heads,
        swa_num_key_value_heads=2 * hf_config.num_key_value_heads,
        head_dim=hf_config.head_dim,
        v_head_dim=hf_config.v_head_dim,
        partial_rotary_factor=factors.pop(),
        rope_theta=ropes[AttentionType.GLOBAL.value]["rope_theta"],
        swa_rope_theta=ropes[AttentionType.SLIDING.value]["rope_theta"],
        sliding_window=hf_config.sliding_window - 1,
        hybrid_layer_pattern=[int(AttentionType(kind) is AttentionType.SLIDING) for kind in hf_config.layer_types],
        add_swa_attention_sink_bias=True,
        add_full_attention_sink_bias=False,
        attention_value_scale=1.0 if value_scale is None else value_scale,
        **moe_pattern_fields([int(kind == HF_SPARSE) for kind in mlp_types]),
        ffn_hidden_size=hf_config.intermediate_size,
        num_experts=hf_config.n_routed_experts,
        moe_ffn_hidden_size=hf_config.moe_intermediate_size,
        moe_router_topk=hf_config.num_experts_per_tok,
        layernorm_epsilon=hf_config.rms_norm_eps,
        max_position_embeddings=hf_config.max_position_embeddings,
        untie_embeddings_and_output_weights=True,
    ).validate()
