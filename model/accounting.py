"""Parameter and FLOP counts of a MiMo model, computed from its ModelConfig alone (nothing is built).

Parameter convention: learnable parameters only. The expert-bias vectors (``e_score_correction_bias``) are
buffers updated by a rule, not by the optimizer, and are not counted; the attention sinks are parameters and are.
"Active" parameters are those one token's main-model forward touches: everything except the experts the router
did not pick. The input embedding and the LM head are included (the MTP blocks are not), which gives the 15.45B
of the released model; ``active_excluding_embedding`` (14.82B) is the other common convention.

FLOP convention: multiply-accumulates of matrix products count 2 FLOPs; norms, activations, softmax, RoPE and
the loss are not counted; the embedding lookup costs nothing; the LM head is counted, once for the main model
and once per MTP block (which shares it). Attention scores cost 2 * heads * (qk_dim + v_dim) per visible key:
a global layer's query at position p sees p + 1 keys, a sliding-window one min(window + 1, p + 1). Training is
3x the forward (the backward computes two products per forward product), without activation recomputation.
"""

from dataclasses import dataclass

from mimo.model.config import AttentionType, ModelConfig

FLOPS_PER_MAC = 2
TRAINING_FLOPS_PER_FORWARD = 3
SWIGLU_MATRICES = 3
"""gate, up and down projections."""


@dataclass(frozen=True)
class ParameterCounts:
    embedding: int
    output_layer: int
    attention: int
    """All decoder layers: q, k, v, o projections and sinks."""
    dense_mlp: int
    experts: int
    """All routed experts of all MoE layers."""
    routers: int
    norms: int
    """Two per decoder layer plus the final norm."""
    mtp: int
    """All MTP blocks (their embedding and head are shared with the main model and counted there)."""
    active_experts: int
    """The experts one token uses: top-k per MoE layer."""

    @property
    def main(self) -> int:
        return (
            self.embedding
            + self.output_layer
            + self.attention
            + self.dense_mlp
            + self.experts
            + self.routers
            + self.norms
        )

    @property
    def total(self) -> int:
        return self.main + self.mtp

    @property
    def active(self) -> int:
        return self.main - self.experts + self.active_experts

    @property
    def active_excluding_embedding(self) -> int:
        return self.active - self.embedding


@dataclass(frozen=True)
class FlopsPerToken:
    """Forward FLOPs per token of a training sequence, by component; ``training`` is the fwd+bwd total."""

    attention_projections: float
    attention_scores: float
    dense_mlp: float
    experts: float
    routers: float
    lm_head: float
    mtp: float
    """MTP blocks' products except attention scores: eh_proj, attention projections, FFN, their LM-head pass."""
    mtp_attention_scores: float

    @property
    def forward(self) -> float:
        return (
            self.attention_projections
            + self.attention_scores
            + self.dense_mlp
            + self.experts
            + self.routers
            + self.lm_head
            + self.mtp
            + self.mtp_attention_scores
        )

    @property
    def training(self) -> float:
        return TRAINING_FLOPS_PER_FORWARD * self.forward


def attention_parameters(cfg: ModelConfig, kind: AttentionType) -> int:
    hidden, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads(kind)
    projections = (
        hidden * (heads * cfg.head_dim + kv * cfg.head_dim + kv * cfg.v_head_dim) + heads * cfg.v_head_dim * hidden
    )
    return projections + (heads if cfg.has_sink(kind) else 0)


def mlp_parameters(hidden: int, width: int) -> int:
    return SWIGLU_MATRICES * hidden * width


def mtp_block_parameters(cfg: ModelConfig) -> int:
    """enorm + hnorm, eh_proj (2H -> H), one SWA layer with a dense FFN (two norms), final norm."""
    hidden = cfg.hidden_size
    enorm_hnorm, layer_norms, final_norm = 2 * hidden, 2 * hidden, hidden
    return (
        enorm_hnorm
        + layer_norms
        + final_norm
        + 2 * hidden * hidden
        + attention_parameters(cfg, AttentionType.SLIDING)
        + mlp_parameters(hidden, cfg.ffn_hidden_size)
    )


def parameter_counts(cfg: ModelConfig) -> ParameterCounts:
    cfg.validate()
    hidden = cfg.hidden_size
    expert = mlp_parameters(hidden, cfg.moe_ffn_hidden_size)
    moe_layers = cfg.num_moe_layers
    dense_layers = cfg.num_layers - moe_layers
    return ParameterCounts(
        embedding=cfg.vocab_size * hidden,
        output_layer=cfg.vocab_size * hidden,
        attention=sum(attention_parameters(cfg, kind) for kind in cfg.layer_types()),
        dense_mlp=dense_layers * mlp_parameters(hidden, cfg.ffn_hidden_size),
        experts=moe_layers * cfg.num_experts * expert,
        routers=moe_layers * cfg.num_experts * hidden,
        norms=(2 * cfg.num_layers + 1) * hidden,
        mtp=cfg.mtp_num_layers * mtp_block_parameters(cfg),
        active_experts=moe_layers * cfg.moe_router_topk * expert,
    )


def mean_visible_keys(seq_length: int, window: int | None) -> float:
    """Keys a query sees, averaged over the positions of a sequence: causal, or capped at window + 1."""
    if window is None or seq_length <= window + 1:
        return (seq_length + 1) / 2
    span = window + 1
    return (span * (span + 1) / 2 + (seq_length - span) * span) / seq_length


def _attention_flops(cfg: ModelConfig, kind: AttentionType, seq_length: int) -> tuple[float, float]:
    """(projection, score) forward FLOPs per token of one attention layer."""
    projections = attention_parameters(cfg, kind) - (cfg.num_attention_heads if cfg.has_sink(kind) else 0)
    scores = cfg.num_attention_heads * (cfg.head_dim + cfg.v_head_dim) * mean_visible_keys(seq_length, cfg.window(kind))
    return FLOPS_PER_MAC * projections, FLOPS_PER_MAC * scores


def flops_per_token(cfg: ModelConfig, seq_length: int) -> FlopsPerToken:
    """Forward FLOPs per token for training on sequences of ``seq_length`` tokens (see the module docstring)."""
    cfg.validate()
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length} must be at least 1")
    hidden = cfg.hidden_size
    dense_layers = cfg.num_layers - cfg.num_moe_layers
    per_layer = [_attention_flops(cfg, kind, seq_length) for kind in cfg.layer_types()]
    lm_head = FLOPS_PER_MAC * hidden * cfg.vocab_size
    mtp_projection, mtp_scores = _attention_flops(cfg, AttentionType.SLIDING, seq_length)
    mtp_block = (
        FLOPS_PER_MAC * 2 * hidden * hidden
        + mtp_projection
        + FLOPS_PER_MAC * mlp_parameters(hidden, cfg.ffn_hidden_size)
        + lm_head
    )
    return FlopsPerToken(
        attention_projections=sum(projection for projection, _ in per_layer),
        attention_scores=sum(scores for _, scores in per_layer),
        dense_mlp=FLOPS_PER_MAC * dense_layers * mlp_parameters(hidden, cfg.ffn_hidden_size),
        experts=FLOPS_PER_MAC
        * cfg.num_moe_layers
        * cfg.moe_router_topk
        * mlp_parameters(hidden, cfg.moe_ffn_hidden_size),
        routers=FLOPS_PER_MAC * cfg.num_moe_layers * cfg.num_experts * hidden,
        lm_head=lm_head,
        mtp=cfg.mtp_num_layers * mtp_block,
        mtp_attention_scores=cfg.mtp_num_layers * mtp_scores,
    )
