"""The activations the backward pass keeps, tensor by tensor, for the modules mimo builds (megatron's unfused
SwiGLU and RoPE, its router and token permutation, and the attention backend), under the configured
recomputation and the 1F1B schedule's in-flight micro-batches."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mimo.model.config import SHORT_ATTENTION_SCORES, AttentionType, ModelConfig
from mimo.parallel.config import HALO
from mimo.parallel.layout import ResolvedLayout
from mimo.recipes.schema import MimoConfig
from mimo.train.tools.plan.settings import BYTES, FP32, INT64

ROPE_SAVED_TENSORS = 4
"""cos and sin, for the queries and for the keys."""
GLU_SAVED_WIDTHS = 5
"""megatron's unfused SwiGLU (bias_activation_fusion is off) keeps fc1's output (2 widths), the SiLU output, the
linear half plus glu_linear_offset (a copy) and their product (fc2's input)."""
EXPERT_GLU_SAVED_WIDTHS = 4
"""Experts: the SwiGLU's SiLU output, linear-half copy and product, and the product scaled by the routing
probability (fc2's input); fc1's output (2 widths) is counted separately, as selective moe_act keeps it."""


@dataclass(frozen=True)
class Recompute:
    """The activation recomputation megatron-core is configured with (its own names and meanings)."""

    granularity: str | None = None
    """None | selective | full."""
    method: str | None = None
    """full only: uniform (checkpoint groups of num_layers) | block (recompute the first num_layers per chunk)."""
    num_layers: int = 1
    modules: tuple[str, ...] = ("core_attn",)
    """selective only: core_attn, layernorm, mlp, moe, moe_act."""


def recompute_of(cfg: MimoConfig) -> Recompute:
    """Reads ``model.recompute_granularity``/``_method``/``_num_layers``/``_modules`` (megatron's names); a
    config without them trains without recomputation."""
    model = cfg.model
    modules = getattr(model, "recompute_modules", None)
    return Recompute(
        granularity=getattr(model, "recompute_granularity", None),
        method=getattr(model, "recompute_method", None),
        num_layers=getattr(model, "recompute_num_layers", None) or 1,
        modules=tuple(modules) if modules is not None else Recompute.modules,
    )


def describe_recompute(recompute: Recompute) -> str:
    if recompute.granularity == "full":
        return f"full ({recompute.method or 'uniform'}, {recompute.num_layers} layer(s))"
    if recompute.granularity == "selective":
        return "selective: " + ", ".join(recompute.modules)
    return "none"


@dataclass(frozen=True)
class Shape:
    """One micro-batch as a rank of the layout sees it."""

    batch: int
    """Sequences in the micro-batch."""
    seq: int
    """Tokens of each sequence on this rank: seq_length / cp."""
    cp: int
    tp: int
    sp: bool
    etp: int
    act_bytes: int
    backend: str
    window_exchange: str = HALO
    """``parallel.cp_window_exchange``."""

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def local_tokens(self) -> float:
        """Tokens in the sequence-parallel regions (norms, residual, MoE input) of this rank."""
        return self.tokens / self.tp if self.sp else self.tokens

    @property
    def math_bytes(self) -> int:
        """Element size of the tensors the local backend computes in at least fp32 (softmax, SDPA's math path)."""
        return max(self.act_bytes, FP32)


def selective(recompute: Recompute, module: str) -> bool:
    return recompute.granularity == "selective" and module in recompute.modules


def _norm_saved(model: ModelConfig, shape: Shape, recompute: Recompute) -> float:
    """One RMSNorm with its output, which the linear layer reading it keeps. TE's norm keeps its input and the
    fp32 reciprocal RMS; mimo's local norm computes in fp32 and keeps the fp32 input, the normalised tensor
    before the weight and the reciprocal RMS. Selective "layernorm" recomputation keeps only the input."""
    h, b, tokens = model.hidden_size, shape.act_bytes, shape.local_tokens
    if selective(recompute, "layernorm"):
        return tokens * h * b
    own = tokens * (h * b + FP32) if shape.backend == "te" else tokens * (h * FP32 + h * b + FP32)
    return own + tokens * h * b


def _rope_saved(model: ModelConfig, shape: Shape) -> float:
    """megatron's unfused RoPE (apply_rope_fusion is off) keeps cos and sin for the queries and for the keys."""
    return ROPE_SAVED_TENSORS * shape.tokens * model.rotary_dim * shape.act_bytes


def _core_attention_saved(model: ModelConfig, kind: AttentionType, shape: Shape, recompute: Recompute) -> float:
    """What the core attention keeps besides its output (which the output projection keeps)."""
    heads, kv = model.num_attention_heads / shape.tp, model.num_kv_heads(kind) / shape.tp
    dk, dv, b = model.head_dim, model.v_head_dim, shape.act_bytes
    qkv = shape.tokens * (heads * dk + kv * dk + kv * dv) * b
    if selective(recompute, "core_attn"):
        return qkv  # the checkpoint's inputs; scores and softmax statistics are recomputed
    sink_under_cp = shape.cp > 1 and model.has_sink(kind)  # mimo's attention on either backend (model/specs.py)
    if shape.backend == "te" and not sink_under_cp:
        return qkv + shape.tokens * heads * FP32  # flash attention: q, k, v and the fp32 log-sum-exp
    received = _received_keys_saved(model, kind, shape)
    # Short calls run dense (SHORT_ATTENTION_SCORES; per-call keys taken as the whole sequence's under cp).
    if shape.batch * heads * shape.seq * shape.seq * shape.cp > SHORT_ATTENTION_SCORES:
        return received + _tiled_attention_saved(model, kind, shape, heads)
    if model.window(kind) is None and not model.has_sink(kind):
        return received + _sdpa_math_saved(model, shape, heads)
    return received + _local_window_saved(model, kind, shape, heads)


def _received_keys_saved(model: ModelConfig, kind: AttentionType, shape: Shape) -> float:
    """Under context parallelism mimo's attention keeps the keys and values it received: on sliding-window layers
    with the halo exchange at most the ``window`` before each of its two chunks, otherwise the all-gathered ones
    of the whole sequence."""
    if shape.cp == 1:
        return 0.0
    token_bytes = model.num_kv_heads(kind) / shape.tp * (model.head_dim + model.v_head_dim) * shape.act_bytes
    window = model.window(kind)
    if window is not None and shape.window_exchange == HALO:
        return shape.batch * 2 * window * token_bytes
    return shape.tokens * shape.cp * token_bytes


def _sdpa_math_saved(model: ModelConfig, shape: Shape, heads: float) -> float:
    """torch SDPA on CPU, called with enable_gqa as mimo's causal attention does, runs its math path in at least
    fp32: it keeps the scaled queries, the keys and values expanded to every query head, and the seq x seq
    softmax."""
    positions = shape.batch * heads * shape.seq
    return positions * (2 * model.head_dim + model.v_head_dim + shape.seq) * shape.math_bytes


def _local_window_saved(model: ModelConfig, kind: AttentionType, shape: Shape, heads: float) -> float:
    """mimo's dense ``sliding_window_attention`` of short calls (SWA layers, and global layers with a sink as a
    window spanning the sequence): per query head the padded queries, the block + window keys and values each
    block of ``window`` queries meets (materialised per query head by the broadcast matmul), and the fp32
    softmax over them with the sink column, plus its copy in the activation dtype below fp32; one boolean
    visibility mask."""
    seq, window = shape.seq, model.window(kind)
    window = min(seq - 1 if window is None else window, seq - 1)
    block = max(window, 1)
    blocks = math.ceil(seq / block)
    span = block + window
    query_blocks = shape.batch * heads * blocks
    inputs = query_blocks * (block * model.head_dim + span * (model.head_dim + model.v_head_dim)) * shape.act_bytes
    probs = query_blocks * block * (span + (1 if model.has_sink(kind) else 0)) * FP32
    if shape.act_bytes < FP32:
        probs += query_blocks * block * span * shape.act_bytes
    return inputs + probs + blocks * block * span * BYTES["bool"]


def _tiled_attention_saved(model: ModelConfig, kind: AttentionType, shape: Shape, heads: float) -> float:
    """mimo's tiled attention (``mimo.model.attention_kernel``) keeps its inputs, the rotated queries and keys and
    the scaled values (new tensors, next to the fused projection output that RoPE keeps), and with a sink the
    keys' share of each query row's probability, in at least fp32. Its output is the output projection's input;
    the backward recomputes the probabilities."""
    kv = model.num_kv_heads(kind) / shape.tp
    inputs = shape.tokens * (heads * model.head_dim + kv * (model.head_dim + model.v_head_dim)) * shape.act_bytes
    return inputs + (shape.tokens * heads * shape.math_bytes if model.has_sink(kind) else 0.0)


def _attention_saved(model: ModelConfig, kind: AttentionType, shape: Shape, recompute: Recompute) -> float:
    """The input norm, RoPE, the core attention and its output (the output projection's input)."""
    out = shape.tokens * model.num_attention_heads / shape.tp * model.v_head_dim * shape.act_bytes
    return (
        _norm_saved(model, shape, recompute)
        + _rope_saved(model, shape)
        + _core_attention_saved(model, kind, shape, recompute)
        + out
    )


def _dense_ffn_saved(model: ModelConfig, shape: Shape, recompute: Recompute) -> float:
    norm = _norm_saved(model, shape, recompute)
    if selective(recompute, "mlp"):
        return norm
    return norm + shape.tokens * GLU_SAVED_WIDTHS * model.ffn_hidden_size / shape.tp * shape.act_bytes


def _ffn_saved(model: ModelConfig, layer: int, shape: Shape, recompute: Recompute) -> float:
    if not model.is_moe(layer):
        return _dense_ffn_saved(model, shape, recompute)
    norm = _norm_saved(model, shape, recompute)
    if selective(recompute, "moe"):
        return norm
    tokens, experts, topk = shape.local_tokens, model.num_experts, model.moe_router_topk
    # fp32 logits and sigmoid scores, top-k indices (twice), top-k probabilities and their normalising sums
    router = tokens * (experts * 2 * FP32 + topk * 2 * INT64 + topk * FP32 + 2 * FP32)
    # the routing map (bool) and the probabilities scattered over it (fp32), the permutation's indices
    permutation = tokens * experts * (BYTES["bool"] + FP32) + tokens * topk * INT64
    rows = dispatched_rows(model, shape)
    width = model.moe_ffn_hidden_size / shape.etp
    glu = 0 if selective(recompute, "moe_act") else EXPERT_GLU_SAVED_WIDTHS * width
    experts_saved = rows * (model.hidden_size + 2 * width + glu) * shape.act_bytes + rows * FP32  # + each row's prob
    return norm + router + permutation + experts_saved


def dispatched_rows(model: ModelConfig, shape: Shape) -> float:
    """Token copies one rank's experts process per layer: its local tokens x top-k (balanced routing), gathered
    over the expert-tensor-parallel group."""
    return shape.local_tokens * model.moe_router_topk * shape.etp


def _layer_saved(model: ModelConfig, layer: int, shape: Shape, recompute: Recompute) -> float:
    kind = model.layer_types()[layer]
    return _attention_saved(model, kind, shape, recompute) + _ffn_saved(model, layer, shape, recompute)


def chunk_activations(
    model: ModelConfig, layers: Sequence[int], shape: Shape, recompute: Recompute
) -> tuple[float, float]:
    """(bytes kept per micro-batch, bytes rematerialised at once during backward) for one model chunk."""
    full = [_layer_saved(model, layer, shape, recompute) for layer in layers]
    if recompute.granularity != "full" or not layers:
        return sum(full), 0.0
    layer_input = shape.local_tokens * model.hidden_size * shape.act_bytes
    group = max(1, recompute.num_layers)
    if recompute.method == "block":
        recomputed = min(group, len(layers))
        return recomputed * layer_input + sum(full[recomputed:]), max(full[:recomputed], default=0.0)
    groups = [full[start : start + group] for start in range(0, len(full), group)]
    return len(groups) * layer_input, max(sum(g) for g in groups)


def last_stage_extras(model: ModelConfig, shape: Shape, recompute: Recompute) -> tuple[float, float]:
    """(activations, logits) of the final norm, the MTP blocks and the loss heads for one micro-batch."""
    h, b, tokens = model.hidden_size, shape.act_bytes, shape.local_tokens
    final_norm = _norm_saved(model, shape, Recompute())  # its output is the LM head's input
    # enorm and hnorm without their outputs (concatenated into eh_proj's 2h-wide input), the SWA layer with its
    # dense FFN, the block's final norm and its output (the shared LM head's input)
    norm_own = _norm_saved(model, shape, Recompute()) - tokens * h * b
    mtp_block = (
        2 * norm_own
        + tokens * 2 * h * b
        + _attention_saved(model, AttentionType.SLIDING, shape, recompute)
        + _dense_ffn_saved(model, shape, recompute)
        + _norm_saved(model, shape, Recompute())
    )
    activations = final_norm + model.mtp_num_layers * mtp_block
    vocab_slice = shape.tokens * model.vocab_size / shape.tp
    heads = 1 + model.mtp_num_layers
    # The cross entropy of each head keeps its fp32 softmax; below fp32 the logits live next to their fp32 copy
    # while a loss is computed (in fp32 the softmax is computed in place of the logits).
    logits = heads * vocab_slice * FP32 + (vocab_slice * b if b < FP32 else 0)
    return activations, logits


def in_flight_micro_batches(layout: ResolvedLayout, rank: int) -> int:
    """Chunk-micro-batches whose activations rank ``rank`` holds at the end of the 1F1B warm-up."""
    if layout.vpp is None:
        return min(layout.pp - rank, layout.num_microbatches)
    warmup = (layout.pp - rank - 1) * 2 + (layout.vpp - 1) * layout.pp
    return min(warmup + 1, layout.num_microbatches * layout.vpp)
