"""Every hyperparameter of a MiMo-V2-Flash-shaped model. Field names follow the transformers config where one exists."""

from dataclasses import dataclass, field
from typing import List, Optional


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
    """Previous tokens an SWA query sees besides itself (128 at full scale; transformers' sliding_window is this + 1)."""
    hybrid_layer_pattern: Optional[List[int]] = None
    """Per layer 0 = GA, 1 = SWA. None: GA at layer 0 and wherever (i + 1) % 6 == 0, as the released model."""
    add_swa_attention_sink_bias: bool = True
    add_full_attention_sink_bias: bool = False
    attention_value_scale: float = 0.707
    num_dense_layers: int = 1
    """The first layers use a dense SwiGLU FFN; all later ones are MoE."""
    ffn_hidden_size: int = 128
    """Width of the dense FFN (layer 0 and MTP blocks)."""
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


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"
    """Parameter/compute dtype: fp32 | bf16."""
    fp8: Optional[str] = None
    """None | blockwise (Hopper) | mxfp8 (Blackwell); needs Transformer Engine."""
