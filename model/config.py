"""Every hyperparameter of a MiMo-V2-Flash-shaped model. Field names follow the transformers config where one exists.

The dataclasses stay plain (Hydra builds them from YAML); ``validate()`` is called by whoever consumes them, so a
bad recipe fails before any process group or weight exists, with a message naming the key and the fix.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from mimo.recipes.errors import MimoError


class ModelConfigError(MimoError, ValueError):
    """A model or precision config that cannot describe a buildable MiMo model."""


class AttentionType(str, Enum):
    """Attention flavour of one layer. The values are transformers' ``layer_types`` spellings."""

    GLOBAL = "full_attention"
    SLIDING = "sliding_attention"


GA_PATTERN_PERIOD = 6
"""The released model puts a global-attention layer at layer 0 and at every layer i with (i + 1) % 6 == 0."""

SHORT_ATTENTION_SCORES = 1 << 21
"""Attention calls of the local backend whose whole score matrix (batch x heads x queries x keys) has at most this
many elements (8 MiB in FP32, what one step of the tiled kernel holds) run dense: torch's fused SDPA, or one
block product per ``window`` queries, beat the tiled kernel's per-call work at such sizes (the tiny model's 128
tokens: about 2x); longer ones run the tiled kernel in O(seq x tile) memory (``mimo.model.core_attention``).
The planner's local activation model follows the same split."""

TOKEN_DISPATCHERS = ("alltoall", "allgather", "flex")
PARAM_DTYPES = ("fp32", "bf16")
FP8_RECIPES = ("blockwise", "mxfp8")
FP8_BACKENDS = ("auto", "te", "emulated")


@dataclass
class ModelConfig:
    name: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 64
    vocab_size: int = 4096
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    """KV heads of global-attention (GA) layers."""
    swa_num_key_value_heads: int = 4
    """KV heads of sliding-window (SWA) layers."""
    head_dim: int = 24
    """Query/key head dimension (192 at full scale)."""
    v_head_dim: int = 16
    """Value head dimension (128 at full scale)."""
    partial_rotary_factor: float = 0.334
    """Fraction of head_dim carrying RoPE: int(head_dim * factor) leading dims (64 of 192)."""
    rope_theta: float = 640_000.0
    """RoPE base of GA layers (640K in stages 1-2, 5M from the 256K stage on)."""
    swa_rope_theta: float = 10_000.0
    """RoPE base of SWA layers."""
    sliding_window: int = 8
    """Previous tokens an SWA query sees besides itself (128 at full scale; transformers' sliding_window is
    this + 1)."""
    hybrid_layer_pattern: list[int] | None = None
    """Per layer 0 = GA, 1 = SWA. None: GA at layer 0 and wherever (i + 1) % 6 == 0, as the released model."""
    add_swa_attention_sink_bias: bool = True
    add_full_attention_sink_bias: bool = False
    attention_value_scale: float = 0.707
    num_dense_layers: int = 1
    """Shorthand for the released model's FFN pattern: the first num_dense_layers layers use a dense SwiGLU FFN,
    all later ones are MoE. Used only while moe_layer_pattern is null."""
    moe_layer_pattern: list[int] | None = None
    """Per layer 1 = MoE FFN, 0 = dense FFN, for dense layers anywhere (the Hub's ``moe_layer_freq``, megatron's
    list ``moe_layer_freq``). null: the num_dense_layers shorthand. When given, it alone decides."""
    ffn_hidden_size: int = 128
    """Width of the dense FFN (the dense layers and the MTP blocks)."""
    num_experts: int = 8
    moe_ffn_hidden_size: int = 32
    moe_router_topk: int = 2
    moe_aux_loss_coeff: float = 1e-5
    """Sequence-level auxiliary load-balancing loss coefficient."""
    moe_router_bias_update_rate: float = 1e-3
    """Aux-loss-free expert-bias update rate."""
    moe_token_dispatcher: str = "alltoall"
    """alltoall | allgather | flex."""
    moe_grouped_gemm: bool = False
    mtp_num_layers: int = 1
    mtp_loss_weight: float = 0.3
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.006
    max_position_embeddings: int = 262_144
    untie_embeddings_and_output_weights: bool = True
    recompute_granularity: str | None = None
    """Activation recomputation (megatron's meaning): None | full | selective. Trades compute for memory only."""
    recompute_method: str | None = None
    """With full recomputation: uniform | block."""
    recompute_num_layers: int | None = None
    """With full recomputation: layers per recomputed group (uniform) or recomputed layers per stage (block)."""
    recompute_modules: list[str] | None = None
    """With selective recomputation: megatron's module names (core_attn, mlp, moe, layernorm, ...)."""

    def validate(self) -> "ModelConfig":
        """Raise ModelConfigError for the first invalid setting; return self so calls can chain."""
        for key in (
            "num_layers",
            "hidden_size",
            "vocab_size",
            "num_attention_heads",
            "num_key_value_heads",
            "swa_num_key_value_heads",
            "head_dim",
            "v_head_dim",
            "sliding_window",
            "ffn_hidden_size",
            "max_position_embeddings",
        ):
            _require(getattr(self, key) >= 1, f"model.{key}={getattr(self, key)} must be at least 1")
        for key in ("rope_theta", "swa_rope_theta", "attention_value_scale", "layernorm_epsilon", "init_method_std"):
            _require(getattr(self, key) > 0, f"model.{key}={getattr(self, key)} must be positive")
        for key in ("moe_aux_loss_coeff", "moe_router_bias_update_rate", "mtp_loss_weight"):
            _require(getattr(self, key) >= 0, f"model.{key}={getattr(self, key)} must be zero or positive")
        self._validate_attention()
        self._validate_layers()
        self._validate_moe()
        _require(self.mtp_num_layers >= 0, f"model.mtp_num_layers={self.mtp_num_layers} must be 0 (no MTP) or more")
        _require(
            self.untie_embeddings_and_output_weights,
            "model.untie_embeddings_and_output_weights=false: MiMo keeps the input embedding and the LM head"
            " separate (the MTP blocks share both with the main model); set it to true",
        )
        return self

    def _validate_attention(self) -> None:
        heads = self.num_attention_heads
        for key in ("num_key_value_heads", "swa_num_key_value_heads"):
            _require(
                heads % getattr(self, key) == 0,
                f"model.num_attention_heads={heads} is not divisible by model.{key}={getattr(self, key)};"
                f" every KV head must serve the same number of query heads, pick a divisor of {heads}",
            )
        _require(
            0 < self.partial_rotary_factor <= 1,
            f"model.partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1]",
        )
        rotary = self.rotary_dim
        _require(
            rotary > 0 and rotary % 2 == 0,
            f"model.partial_rotary_factor={self.partial_rotary_factor} gives rotary dim int({self.head_dim} *"
            f" {self.partial_rotary_factor}) = {rotary}, which must be even and positive (RoPE rotates pairs of"
            " dims); adjust model.partial_rotary_factor or model.head_dim (0.3333 with head_dim 192 gives 63:"
            " use 0.334)",
        )

    def _validate_layers(self) -> None:
        self._validate_pattern(
            "hybrid_layer_pattern",
            ("GA", "SWA"),
            ("global attention", "sliding-window attention"),
            "the released model's pattern",
        )
        _require(
            0 <= self.num_dense_layers <= self.num_layers,
            f"model.num_dense_layers={self.num_dense_layers} must be between 0 and model.num_layers={self.num_layers}",
        )
        self._validate_pattern(
            "moe_layer_pattern", ("dense FFN", "MoE"), ("dense FFN", "MoE"), "the num_dense_layers shorthand"
        )

    def _validate_pattern(self, key: str, short: tuple[str, str], long: tuple[str, str], when_null: str) -> None:
        """A per-layer list of 0/1 (``model.<key>``): one entry per layer, nothing but 0 and 1."""
        pattern = getattr(self, key)
        if pattern is None:
            return
        _require(
            len(pattern) == self.num_layers,
            f"model.{key} has {len(pattern)} entries but model.num_layers={self.num_layers}; give one entry"
            f" (0 = {short[0]}, 1 = {short[1]}) per layer, or null for {when_null}",
        )
        bad = sorted({value for value in pattern if value not in (0, 1)})
        _require(not bad, f"model.{key} contains {bad}; entries must be 0 ({long[0]}) or 1 ({long[1]})")

    def _validate_moe(self) -> None:
        _require(
            self.moe_token_dispatcher in TOKEN_DISPATCHERS,
            f"model.moe_token_dispatcher={self.moe_token_dispatcher!r} is not one of {', '.join(TOKEN_DISPATCHERS)}",
        )
        if not self.num_moe_layers:
            return
        _require(
            self.num_experts >= 1,
            f"model.num_experts={self.num_experts} but layers {self.moe_layers()} are MoE; give at least one expert"
            " or make every layer dense (model.num_dense_layers = model.num_layers, model.moe_layer_pattern=null)",
        )
        _require(
            1 <= self.moe_router_topk <= self.num_experts,
            f"model.moe_router_topk={self.moe_router_topk} must be between 1 and model.num_experts={self.num_experts}",
        )
        _require(self.moe_ffn_hidden_size >= 1, f"model.moe_ffn_hidden_size={self.moe_ffn_hidden_size} must be >= 1")

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each query/key head that carry RoPE; int() truncates, as every reference does."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_pattern())

    def moe_pattern(self) -> list[int]:
        """The FFN of every layer (1 = MoE, 0 = dense): moe_layer_pattern, or the num_dense_layers shorthand."""
        if self.moe_layer_pattern is not None:
            return list(self.moe_layer_pattern)
        return [0] * self.num_dense_layers + [1] * (self.num_layers - self.num_dense_layers)

    def moe_layers(self) -> list[int]:
        """Indices of the MoE layers."""
        return [layer for layer, moe in enumerate(self.moe_pattern()) if moe]

    def layer_pattern(self) -> list[int]:
        """The hybrid pattern per layer (0 = GA, 1 = SWA), with the released model's rule when none is given."""
        if self.hybrid_layer_pattern is not None:
            return list(self.hybrid_layer_pattern)
        return [0 if i == 0 or (i + 1) % GA_PATTERN_PERIOD == 0 else 1 for i in range(self.num_layers)]

    def layer_types(self) -> list[AttentionType]:
        """Attention type of every decoder layer (MTP blocks are always sliding-window)."""
        return [AttentionType.SLIDING if value else AttentionType.GLOBAL for value in self.layer_pattern()]

    def is_moe(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (0-based) has a routed-expert FFN instead of the dense one."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} is outside 0..{self.num_layers - 1}")
        return bool(self.moe_pattern()[layer])

    def num_kv_heads(self, kind: AttentionType) -> int:
        return self.swa_num_key_value_heads if kind is AttentionType.SLIDING else self.num_key_value_heads

    def rope_base(self, kind: AttentionType) -> float:
        return self.swa_rope_theta if kind is AttentionType.SLIDING else self.rope_theta

    def has_sink(self, kind: AttentionType) -> bool:
        return self.add_swa_attention_sink_bias if kind is AttentionType.SLIDING else self.add_full_attention_sink_bias

    def window(self, kind: AttentionType) -> int | None:
        """Previous tokens a query sees besides itself; None for unbounded (causal) attention."""
        return self.sliding_window if kind is AttentionType.SLIDING else None


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"
    """Parameter/compute dtype: fp32 | bf16."""
    fp8: str | None = None
    """None | blockwise (Hopper) | mxfp8 (Blackwell): the FP8 recipe of the GEMMs (see mimo.model.precision)."""
    fp8_backend: str = "auto"
    """Who runs the FP8 GEMMs: auto (Transformer Engine's kernels when the model runs on Transformer Engine,
    mimo's emulation otherwise) | te | emulated (also on a GPU with Transformer Engine, to compare the two)."""

    def validate(self) -> "PrecisionConfig":
        _require(self.dtype in PARAM_DTYPES, f"precision.dtype={self.dtype!r} is not one of {', '.join(PARAM_DTYPES)}")
        _require(
            self.fp8_backend in FP8_BACKENDS,
            f"precision.fp8_backend={self.fp8_backend!r} is not one of {', '.join(FP8_BACKENDS)}",
        )
        if self.fp8 is not None:
            _require(
                self.fp8 in FP8_RECIPES,
                f"precision.fp8={self.fp8!r} is not one of {', '.join(FP8_RECIPES)} (or null for no FP8)",
            )
            _require(
                self.dtype == "bf16",
                f"precision.fp8={self.fp8} needs precision.dtype=bf16 (FP8 GEMMs keep BF16 master activations),"
                f" got {self.dtype}",
            )
        return self


def moe_pattern_fields(pattern: Sequence[int]) -> dict[str, Any]:
    """The ModelConfig fields that spell a per-layer FFN pattern (1 = MoE) the way recipes write it: the
    num_dense_layers shorthand when the dense layers all come first, the explicit list otherwise."""
    pattern = [int(value) for value in pattern]
    leading = pattern.index(1) if 1 in pattern else len(pattern)
    shorthand = pattern == [0] * leading + [1] * (len(pattern) - leading)
    return {"num_dense_layers": leading, "moe_layer_pattern": None if shorthand else pattern}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ModelConfigError(message)
