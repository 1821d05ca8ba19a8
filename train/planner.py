"""``mimo-plan``: what a recipe needs on a cluster before a single GPU is spent on it.

Per GPU memory by part and pipeline stage, FLOPs per token, tokens/s and days per training stage at a stated
MFU, and the communication volume of one step; a layout that does not fit is refused with the amount it is over
by and the changes that would make it fit. Everything is closed-form arithmetic on the config (no torch), so the
numbers can be checked by hand and compared with a measured run.

Memory model (bytes per GPU on pipeline stage r, the largest stage decides):

* weights: the parameters the rank holds (attention, dense FFN, embedding and head split by tp; experts split by
  ep * etp; norms and routers replicated), in the parameter dtype; plus FP8 copies (weight and transpose) of the
  FP8 GEMM weights when ``precision.fp8`` is set.
* gradients: one fp32 buffer per parameter (the trainer reduces gradients in fp32).
* optimizer: Adam moments (and an fp32 master copy when parameters are bf16), sharded over the data-parallel
  ranks of each parameter (dp * cp for dense parameters, expert_dp for experts) under the distributed optimizer.
* activations: what the backward pass keeps per layer and micro-batch, times the layer-micro-batches in flight
  under 1F1B (pp - r micro-batches, or the interleaved schedule's warm-up depth with vpp), reduced by the
  configured recomputation. Counted tensor by tensor for the modules mimo builds: megatron's unfused SwiGLU and
  RoPE, its router and token permutation, and the attention backend (``--backend``): Transformer Engine's flash
  attention keeps no score matrix; mimo's local attention (CPU) keeps sliding-window scores, O(seq x window),
  and torch SDPA's math path keeps the seq x seq softmax of global layers. Under context parallelism each rank
  holds seq / cp tokens, and layers with a sink run mimo's attention on either backend, keeping the all-gathered
  keys and values of the whole sequence. On CPU the estimate matches the bytes the autograd graph saves
  (tests/test_planner_measured.py).
* MoE dispatch: the token buffers of one layer's all-to-all (dispatch and combine), alive while it runs.
* logits: the fp32 softmax kept by the vocab-parallel cross entropy for the LM head and each MTP head, plus the
  bf16 logits alive next to their fp32 copy while the last loss is computed (last stage only).
* a fixed reserve for the CUDA context, NCCL buffers and allocator fragmentation.
"""

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, astuple, dataclass, field, replace

from mimo.model import accounting
from mimo.model.config import AttentionType, ModelConfig
from mimo.parallel.layout import LayoutError, ResolvedLayout, validate_layout
from mimo.recipes import ConfigError, MimoConfig, load_config, recipe_argument_parser
from mimo.train.schedule import Schedule, ScheduleError

GIB = 2**30
SECONDS_PER_DAY = 86_400
BYTES = {"fp32": 4, "bf16": 2, "fp8": 1, "bool": 1, "int64": 8}
FP32 = BYTES["fp32"]
INT64 = BYTES["int64"]
ADAM_MOMENTS = 2
NORMS_PER_LAYER = 2
ROPE_SAVED_TENSORS = 4
"""cos and sin, for the queries and for the keys."""
GLU_SAVED_WIDTHS = 5
"""megatron's unfused SwiGLU (bias_activation_fusion is off) keeps fc1's output (2 widths), the SiLU output, the
linear half plus glu_linear_offset (a copy) and their product (fc2's input)."""
EXPERT_GLU_SAVED_WIDTHS = 4
"""Experts: the SwiGLU's SiLU output, linear-half copy and product, and the product scaled by the routing
probability (fc2's input); fc1's output (2 widths) is counted separately, as selective moe_act keeps it."""


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float
    """Device memory as the driver reports it."""
    bf16_tflops: float
    """Dense BF16 peak; MFU is quoted against it (also for FP8 runs)."""
    nvlink_gb_s: float
    """NVLink bandwidth per GPU and direction (GB/s), inside a node."""
    network_gb_s: float
    """Network bandwidth per GPU and direction (GB/s), between nodes (one 400 Gb/s NIC per GPU)."""
    gpus_per_node: int = 8


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("H100 SXM 80GB", memory_gib=79.6, bf16_tflops=989.4, nvlink_gb_s=450.0, network_gb_s=50.0),
    "h200": GpuSpec("H200 SXM 141GB", memory_gib=140.4, bf16_tflops=989.4, nvlink_gb_s=450.0, network_gb_s=50.0),
    "b200": GpuSpec("B200 180GB", memory_gib=178.4, bf16_tflops=2250.0, nvlink_gb_s=900.0, network_gb_s=50.0),
}


@dataclass(frozen=True)
class PlannerSettings:
    reserved_gib: float = 5.0
    """Kept free for the CUDA context, NCCL's buffers and the caching allocator's fragmentation."""
    mfu: float = 0.4
    """Model-FLOPs utilisation the time estimates assume."""
    backend: str = "te"
    """The modules whose saved activations are estimated: "te" (Transformer Engine, what mimo builds on a GPU
    with TE installed: flash attention, TE's norms) or "local" (mimo's local modules, what runs on CPU)."""


BACKENDS = ("te", "local")


class PlanError(ValueError):
    """A recipe the planner cannot evaluate (bad layout or schedule); the message names what to change."""


# ------------------------------------------------------------------------------------------------ recomputation


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


# --------------------------------------------------------------------------------------------- parameter layout


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one block, grouped by how the layout splits them."""

    tensor_parallel: int = 0
    """Split over tp: attention projections and sinks, dense FFN, embedding/head vocab rows, MTP eh_proj."""
    replicated: int = 0
    """Held whole by every rank of the stage: norms, routers."""
    experts: int = 0
    """Split over ep * etp."""
    fp8_tensor_parallel: int = 0
    """The part of tensor_parallel that runs FP8 GEMMs (all but o_proj, sinks, embedding and head); experts
    always do."""

    def __add__(self, other: "LayerParams") -> "LayerParams":
        return LayerParams(*(a + b for a, b in zip(astuple(self), astuple(other))))


def _attention_params(model: ModelConfig, kind: AttentionType) -> LayerParams:
    """Attention projections and sink (tp) and the layer's two norms (replicated); o_proj stays out of FP8."""
    h = model.hidden_size
    total = accounting.attention_parameters(model, kind)
    heads = model.num_attention_heads
    not_fp8 = heads * model.v_head_dim * h + (heads if model.has_sink(kind) else 0)  # o_proj and sink
    return LayerParams(tensor_parallel=total, replicated=NORMS_PER_LAYER * h, fp8_tensor_parallel=total - not_fp8)


def _dense_ffn_params(model: ModelConfig) -> LayerParams:
    ffn = accounting.mlp_parameters(model.hidden_size, model.ffn_hidden_size)
    return LayerParams(tensor_parallel=ffn, fp8_tensor_parallel=ffn)


def _moe_params(model: ModelConfig) -> LayerParams:
    experts = model.num_experts * accounting.mlp_parameters(model.hidden_size, model.moe_ffn_hidden_size)
    return LayerParams(replicated=model.num_experts * model.hidden_size, experts=experts)


def decoder_layer_params(model: ModelConfig, layer: int) -> LayerParams:
    kind = model.layer_types()[layer]
    ffn = _moe_params(model) if model.is_moe(layer) else _dense_ffn_params(model)
    return _attention_params(model, kind) + ffn


def mtp_block_params(model: ModelConfig) -> LayerParams:
    """eh_proj [2h -> h], one SWA attention and the dense FFN (tp); the block's norms (replicated)."""
    h = model.hidden_size
    eh_proj = 2 * h * h
    attention, ffn = _attention_params(model, AttentionType.SLIDING), _dense_ffn_params(model)
    split = eh_proj + attention.tensor_parallel + ffn.tensor_parallel
    return LayerParams(
        tensor_parallel=split,
        replicated=accounting.mtp_block_parameters(model) - split,
        fp8_tensor_parallel=eh_proj + attention.fp8_tensor_parallel + ffn.fp8_tensor_parallel,
    )


def embedding_params(model: ModelConfig) -> LayerParams:
    return LayerParams(tensor_parallel=model.vocab_size * model.hidden_size)


def head_params(model: ModelConfig) -> LayerParams:
    """The LM head and the final norm."""
    return LayerParams(tensor_parallel=model.vocab_size * model.hidden_size, replicated=model.hidden_size)


# -------------------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class StageMemory:
    """Bytes one GPU of pipeline stage ``stage`` needs, by part."""

    stage: int
    layers: tuple[int, ...]
    """Decoder layers on the stage (over all its virtual chunks)."""
    in_flight: int
    """Micro-batches (chunks, with vpp) whose activations the stage holds at its peak."""
    weights: int
    gradients: int
    optimizer: int
    activations: int
    moe_dispatch: int
    logits: int
    reserved: int

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.moe_dispatch
            + self.logits
            + self.reserved
        )


@dataclass(frozen=True)
class MemoryEstimate:
    stages: tuple[StageMemory, ...]
    capacity: int
    """Bytes of one GPU."""

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda stage: stage.total)

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.capacity


@dataclass(frozen=True)
class _Shape:
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


def _selective(recompute: Recompute, module: str) -> bool:
    return recompute.granularity == "selective" and module in recompute.modules


def _norm_saved(model: ModelConfig, shape: _Shape, recompute: Recompute) -> float:
    """One RMSNorm with its output, which the linear layer reading it keeps. TE's norm keeps its input and the
    fp32 reciprocal RMS; mimo's local norm computes in fp32 and keeps the fp32 input, the normalised tensor
    before the weight and the reciprocal RMS. Selective "layernorm" recomputation keeps only the input."""
    h, b, tokens = model.hidden_size, shape.act_bytes, shape.local_tokens
    if _selective(recompute, "layernorm"):
        return tokens * h * b
    own = tokens * (h * b + FP32) if shape.backend == "te" else tokens * (h * FP32 + h * b + FP32)
    return own + tokens * h * b


def _rope_saved(model: ModelConfig, shape: _Shape) -> float:
    """megatron's unfused RoPE (apply_rope_fusion is off) keeps cos and sin for the queries and for the keys."""
    return ROPE_SAVED_TENSORS * shape.tokens * model.rotary_dim * shape.act_bytes


def _core_attention_saved(model: ModelConfig, kind: AttentionType, shape: _Shape, recompute: Recompute) -> float:
    """What the core attention keeps besides its output (which the output projection keeps)."""
    heads, kv = model.num_attention_heads / shape.tp, model.num_kv_heads(kind) / shape.tp
    dk, dv, b = model.head_dim, model.v_head_dim, shape.act_bytes
    qkv = shape.tokens * (heads * dk + kv * dk + kv * dv) * b
    if _selective(recompute, "core_attn"):
        return qkv  # the checkpoint's inputs; scores and softmax statistics are recomputed
    sink_under_cp = shape.cp > 1 and model.has_sink(kind)  # mimo's attention on either backend (model/specs.py)
    if shape.backend == "te" and not sink_under_cp:
        return qkv + shape.tokens * heads * FP32  # flash attention: q, k, v and the fp32 log-sum-exp
    # Under context parallelism mimo's attention keeps the all-gathered keys and values of the whole sequence.
    gathered = shape.tokens * shape.cp * kv * (dk + dv) * b if shape.cp > 1 else 0.0
    if model.window(kind) is None and not model.has_sink(kind):
        return gathered + _sdpa_math_saved(model, shape, heads)
    return gathered + _local_window_saved(model, kind, shape, heads)


def _sdpa_math_saved(model: ModelConfig, shape: _Shape, heads: float) -> float:
    """torch SDPA on CPU, called with enable_gqa as mimo's causal attention does, runs its math path in at least
    fp32: it keeps the scaled queries, the keys and values expanded to every query head, and the seq x seq
    softmax."""
    positions = shape.batch * heads * shape.seq
    return positions * (2 * model.head_dim + model.v_head_dim + shape.seq) * shape.math_bytes


def _local_window_saved(model: ModelConfig, kind: AttentionType, shape: _Shape, heads: float) -> float:
    """mimo's ``sliding_window_attention`` (SWA layers, and global layers with a sink as a window spanning the
    sequence): per query head the padded queries, the block + window keys and values each block of ``window``
    queries meets (materialised per query head by the broadcast matmul), and the fp32 softmax over them with
    the sink column, plus its copy in the activation dtype below fp32; one boolean visibility mask."""
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


def _attention_saved(model: ModelConfig, kind: AttentionType, shape: _Shape, recompute: Recompute) -> float:
    """The input norm, RoPE, the core attention and its output (the output projection's input)."""
    out = shape.tokens * model.num_attention_heads / shape.tp * model.v_head_dim * shape.act_bytes
    return (
        _norm_saved(model, shape, recompute)
        + _rope_saved(model, shape)
        + _core_attention_saved(model, kind, shape, recompute)
        + out
    )


def _dense_ffn_saved(model: ModelConfig, shape: _Shape, recompute: Recompute) -> float:
    norm = _norm_saved(model, shape, recompute)
    if _selective(recompute, "mlp"):
        return norm
    return norm + shape.tokens * GLU_SAVED_WIDTHS * model.ffn_hidden_size / shape.tp * shape.act_bytes


def _ffn_saved(model: ModelConfig, layer: int, shape: _Shape, recompute: Recompute) -> float:
    if not model.is_moe(layer):
        return _dense_ffn_saved(model, shape, recompute)
    norm = _norm_saved(model, shape, recompute)
    if _selective(recompute, "moe"):
        return norm
    tokens, experts, topk = shape.local_tokens, model.num_experts, model.moe_router_topk
    # fp32 logits and sigmoid scores, top-k indices (twice), top-k probabilities and their normalising sums
    router = tokens * (experts * 2 * FP32 + topk * 2 * INT64 + topk * FP32 + 2 * FP32)
    # the routing map (bool) and the probabilities scattered over it (fp32), the permutation's indices
    permutation = tokens * experts * (BYTES["bool"] + FP32) + tokens * topk * INT64
    rows = _dispatched_rows(model, shape)
    width = model.moe_ffn_hidden_size / shape.etp
    glu = 0 if _selective(recompute, "moe_act") else EXPERT_GLU_SAVED_WIDTHS * width
    experts_saved = rows * (model.hidden_size + 2 * width + glu) * shape.act_bytes + rows * FP32  # + each row's prob
    return norm + router + permutation + experts_saved


def _dispatched_rows(model: ModelConfig, shape: _Shape) -> float:
    """Token copies one rank's experts process per layer: its local tokens x top-k (balanced routing), gathered
    over the expert-tensor-parallel group."""
    return shape.local_tokens * model.moe_router_topk * shape.etp


def _layer_saved(model: ModelConfig, layer: int, shape: _Shape, recompute: Recompute) -> float:
    kind = model.layer_types()[layer]
    return _attention_saved(model, kind, shape, recompute) + _ffn_saved(model, layer, shape, recompute)


def _chunk_activations(
    model: ModelConfig, layers: Sequence[int], shape: _Shape, recompute: Recompute
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


def _last_stage_extras(model: ModelConfig, shape: _Shape, recompute: Recompute) -> tuple[float, float]:
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


def _chunks(layout: ResolvedLayout) -> list[list[int]]:
    """Decoder layers of each model chunk in execution order: chunk c sits on pipeline rank c % pp."""
    vpp = layout.vpp or 1
    sizes = [layout.stage_layers[c % layout.pp] // vpp for c in range(layout.pp * vpp)]
    chunks, start = [], 0
    for size in sizes:
        chunks.append(list(range(start, start + size)))
        start += size
    return chunks


def _in_flight(layout: ResolvedLayout, rank: int) -> int:
    """Chunk-micro-batches whose activations rank ``rank`` holds at the end of the 1F1B warm-up."""
    if layout.vpp is None:
        return min(layout.pp - rank, layout.num_microbatches)
    warmup = (layout.pp - rank - 1) * 2 + (layout.vpp - 1) * layout.pp
    return min(warmup + 1, layout.num_microbatches * layout.vpp)


def _stage_params(model: ModelConfig, layout: ResolvedLayout, rank: int) -> LayerParams:
    layers = [layer for c, chunk in enumerate(_chunks(layout)) if c % layout.pp == rank for layer in chunk]
    params = LayerParams()
    for layer in layers:
        params = params + decoder_layer_params(model, layer)
    if rank == 0:
        params = params + embedding_params(model)
    if rank == layout.pp - 1:
        params = params + head_params(model)
        for _ in range(model.mtp_num_layers):
            params = params + mtp_block_params(model)
        if model.mtp_num_layers and layout.pp > 1:
            params = params + embedding_params(model)  # the MTP blocks embed the next tokens here
    return params


def estimate_memory(
    cfg: MimoConfig,
    *,
    world_size: int,
    gpu: GpuSpec = GPUS["h100"],
    settings: PlannerSettings = PlannerSettings(),
    layout: ResolvedLayout | None = None,
    recompute: Recompute | None = None,
) -> MemoryEstimate:
    """Bytes per GPU by part for every pipeline stage of ``cfg`` on ``world_size`` ranks. The layout and the
    recomputation come from the config unless given; raises PlanError for a layout that cannot run."""
    layout = layout or resolve_layout(cfg, world_size)
    model, recompute = cfg.model, recompute or recompute_of(cfg)
    param_bytes = BYTES[cfg.precision.dtype]
    master_copy = FP32 if param_bytes < FP32 else 0
    dense_shards = layout.dp * layout.cp if cfg.parallel.distributed_optimizer else 1
    expert_shards = layout.expert_dp if cfg.parallel.distributed_optimizer else 1
    if settings.backend not in BACKENDS:
        raise PlanError(f"backend {settings.backend!r} is not one of {', '.join(BACKENDS)}")
    shape = _Shape(
        batch=cfg.train.micro_batch_size,
        seq=cfg.train.seq_length // layout.cp,
        cp=layout.cp,
        tp=layout.tp,
        sp=layout.sequence_parallel,
        etp=layout.etp,
        act_bytes=param_bytes,
        backend=settings.backend,
    )
    chunks = _chunks(layout)
    stages = []
    for rank in range(layout.pp):
        params = _stage_params(model, layout, rank)
        dense = params.tensor_parallel / layout.tp + params.replicated
        experts = params.experts / (layout.ep * layout.etp)
        fp8_copies = 0.0
        if cfg.precision.fp8:
            fp8_copies = 2 * BYTES["fp8"] * (params.fp8_tensor_parallel / layout.tp + experts)
        own_chunks = [chunk for c, chunk in enumerate(chunks) if c % layout.pp == rank]
        kept, remat = zip(*(_chunk_activations(model, chunk, shape, recompute) for chunk in own_chunks))
        in_flight = _in_flight(layout, rank)
        activations = in_flight * max(kept) + max(remat)
        logits = 0.0
        if rank == layout.pp - 1:
            extra, logits = _last_stage_extras(model, shape, recompute)
            activations += extra
        moe_layers = [layer for chunk in own_chunks for layer in chunk if model.is_moe(layer)]
        dispatch = 2 * _dispatched_rows(model, shape) * model.hidden_size * shape.act_bytes if moe_layers else 0.0
        stages.append(
            StageMemory(
                stage=rank,
                layers=tuple(layer for chunk in own_chunks for layer in chunk),
                in_flight=in_flight,
                weights=round((dense + experts) * param_bytes + fp8_copies),
                gradients=round((dense + experts) * FP32),
                optimizer=round((ADAM_MOMENTS * FP32 + master_copy) * (dense / dense_shards + experts / expert_shards)),
                activations=round(activations),
                moe_dispatch=round(dispatch),
                logits=round(logits),
                reserved=round(settings.reserved_gib * GIB),
            )
        )
    return MemoryEstimate(stages=tuple(stages), capacity=round(gpu.memory_gib * GIB))


def resolve_layout(cfg: MimoConfig, world_size: int) -> ResolvedLayout:
    try:
        return validate_layout(
            cfg.parallel,
            cfg.model,
            world_size,
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=cfg.train.micro_batch_size,
            seq_length=cfg.train.seq_length,
        )
    except LayoutError as err:
        raise PlanError(f"layout refused on {world_size} GPUs: {err}") from err


# ------------------------------------------------------------------------------------------- communication


@dataclass(frozen=True)
class Traffic:
    """Bytes one GPU sends per optimizer step over one kind of group (on the busiest stage), and the time that
    takes at the link bandwidth without any overlap with compute."""

    kind: str
    group_size: int
    bytes: int
    between_nodes: float
    """Share of the bytes that leave the node."""
    seconds: float


def _context_parallel_bytes(
    model: ModelConfig, kind: AttentionType, tokens: float, layout: ResolvedLayout, act_bytes: int, forwards: int
) -> float:
    """Bytes one rank sends for one layer's attention under context parallelism, over a step's passes of one
    micro-batch. Either way the keys and values of every other rank's tokens come in (Transformer Engine's ring
    on global layers, mimo's all-gather on sink layers) in each forward, and in the backward again (ring) or
    their gradients go back (reduce-scatter), plus the key/value gradients of the ring: counted as two passes."""
    kv_heads = model.num_kv_heads(kind) / layout.tp
    key_values = tokens * kv_heads * (model.head_dim + model.v_head_dim) * act_bytes * (layout.cp - 1)
    return key_values * (forwards + 2)


def communication(cfg: MimoConfig, layout: ResolvedLayout, gpu: GpuSpec) -> tuple[Traffic, ...]:
    model, recompute = cfg.model, recompute_of(cfg)
    act_bytes = BYTES[cfg.precision.dtype]
    local_tokens = cfg.train.micro_batch_size * cfg.train.seq_length / layout.cp
    local_tokens /= layout.tp if layout.sequence_parallel else 1
    full_tokens = cfg.train.micro_batch_size * cfg.train.seq_length / layout.cp
    hidden = model.hidden_size * act_bytes
    m = layout.num_microbatches
    forwards = 2 if recompute.granularity == "full" else 1
    per_rank = [
        [layer for c, chunk in enumerate(_chunks(layout)) if c % layout.pp == rank for layer in chunk]
        for rank in range(layout.pp)
    ]
    moe_layers = max(sum(model.is_moe(layer) for layer in layers) for layers in per_rank)
    dense_layers = max(sum(not model.is_moe(layer) for layer in layers) for layers in per_rank)
    layers = max(len(layers) for layers in per_rank)
    traffic = []

    def add(kind: str, group: int, volume: float, between_nodes: float) -> None:
        if group > 1 and volume > 0:
            seconds = volume * (1 - between_nodes) / (gpu.nvlink_gb_s * 1e9) + volume * between_nodes / (
                gpu.network_gb_s * 1e9
            )
            traffic.append(Traffic(kind, group, round(volume), between_nodes, seconds))

    ep_forwards = forwards + (1 if _selective(recompute, "moe") else 0)
    ep_passes = 2 * (ep_forwards + 1)  # dispatch + combine, in each forward and the backward
    dispatched = local_tokens * model.moe_router_topk * hidden * (layout.ep - 1) / layout.ep
    same_node = min(layout.ep, max(1, gpu.gpus_per_node // layout.etp))
    ep_between = (layout.ep - same_node) / (layout.ep - 1) if layout.ep > 1 else 0.0
    add("EP all-to-all", layout.ep, ep_passes * moe_layers * m * dispatched, ep_between)

    kinds = model.layer_types()
    attention_kinds = [[kinds[layer] for layer in layers] for layers in per_rank]
    attention_kinds[-1] += [AttentionType.SLIDING] * model.mtp_num_layers  # the MTP blocks' attention
    cp_volume = max(
        sum(_context_parallel_bytes(model, kind, full_tokens, layout, act_bytes, forwards) for kind in stage)
        for stage in attention_kinds
    )
    cp_same_node = min(layout.cp, max(1, gpu.gpus_per_node // layout.tp))  # megatron puts cp right after tp
    cp_between = (layout.cp - cp_same_node) / (layout.cp - 1) if layout.cp > 1 else 0.0
    add("CP attention exchange", layout.cp, m * cp_volume, cp_between)

    tp_collectives = 2 * (forwards + 1) * (layers + dense_layers)  # all-gather + reduce-scatter per block
    add(
        "TP all-gather/reduce-scatter",
        layout.tp,
        tp_collectives * m * full_tokens * hidden * (layout.tp - 1) / layout.tp,
        0.0,
    )

    params = _stage_params(model, layout, max(range(layout.pp), key=lambda r: len(per_rank[r])))
    dense = params.tensor_parallel / layout.tp + params.replicated
    experts = params.experts / (layout.ep * layout.etp)
    per_param = FP32 + act_bytes if cfg.parallel.distributed_optimizer else 2 * FP32
    dense_group, expert_group = layout.dp * layout.cp, layout.expert_dp
    dp_volume = dense * per_param * (dense_group - 1) / max(dense_group, 1)
    dp_volume += experts * per_param * (expert_group - 1) / max(expert_group, 1)
    dp_between = 1.0 if layout.world_size > gpu.gpus_per_node else 0.0
    add("DP gradients and parameters", max(dense_group, expert_group), dp_volume, dp_between)

    pp_between = 1.0 if layout.world_size // layout.pp >= gpu.gpus_per_node else 0.0
    add("PP activations", layout.pp, 2 * m * (layout.vpp or 1) * local_tokens * hidden, pp_between)
    return tuple(traffic)


# -------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class StageTime:
    name: str
    recipe: str | None
    start_tokens: int
    end_tokens: int
    seq_length: int
    tokens_per_s: float
    days: float
    steps: int | None
    """Optimizer steps of the stage under its recipe's layout (None when that layout does not resolve)."""
    current: bool
    """The stage this recipe trains."""


@dataclass(frozen=True)
class Suggestion:
    change: str
    peak_bytes: int
    fits: bool


@dataclass(frozen=True)
class Plan:
    recipe: str
    overrides: tuple[str, ...]
    gpu: GpuSpec
    world_size: int
    mfu: float
    layout: ResolvedLayout
    recompute: Recompute
    params: accounting.ParameterCounts
    flops: accounting.FlopsPerToken
    memory: MemoryEstimate
    traffic: tuple[Traffic, ...]
    tokens_per_s: float
    step_tokens: int
    stages: tuple[StageTime, ...]
    suggestions: tuple[Suggestion, ...] = field(default_factory=tuple)

    @property
    def runs(self) -> bool:
        return self.memory.fits

    @property
    def step_seconds(self) -> float:
        return self.step_tokens / self.tokens_per_s


def tokens_per_second(model: ModelConfig, seq_length: int, world_size: int, gpu: GpuSpec, mfu: float) -> float:
    return world_size * gpu.bf16_tflops * 1e12 * mfu / accounting.flops_per_token(model, seq_length).training


def make_plan(
    cfg: MimoConfig,
    *,
    world_size: int,
    gpu: GpuSpec,
    settings: PlannerSettings = PlannerSettings(),
    recipe: str = "config",
    overrides: Sequence[str] = (),
) -> Plan:
    layout = resolve_layout(cfg, world_size)
    memory = estimate_memory(cfg, world_size=world_size, gpu=gpu, settings=settings, layout=layout)
    plan = Plan(
        recipe=recipe,
        overrides=tuple(overrides),
        gpu=gpu,
        world_size=world_size,
        mfu=settings.mfu,
        layout=layout,
        recompute=recompute_of(cfg),
        params=accounting.parameter_counts(cfg.model),
        flops=accounting.flops_per_token(cfg.model, cfg.train.seq_length),
        memory=memory,
        traffic=communication(cfg, layout, gpu),
        tokens_per_s=tokens_per_second(cfg.model, cfg.train.seq_length, world_size, gpu, settings.mfu),
        step_tokens=cfg.train.global_batch_size * cfg.train.seq_length,
        stages=_stage_times(cfg, world_size, gpu, settings, overrides),
    )
    if not memory.fits:
        plan = replace(plan, suggestions=suggest(cfg, world_size=world_size, gpu=gpu, settings=settings))
    return plan


def _schedule(cfg: MimoConfig, world_size: int) -> tuple[Schedule, int | None]:
    """The run's schedule and batch unit (None when the layout does not resolve: then unit = micro batch)."""
    try:
        unit: int | None = cfg.train.micro_batch_size * resolve_layout(cfg, world_size).dp
    except PlanError:
        unit = None
    try:
        schedule = Schedule(cfg.schedule, optim=cfg.optim, train=cfg.train, model=cfg.model, batch_unit=unit)
    except ScheduleError as err:
        raise PlanError(f"schedule refused: {err}") from err
    return schedule, unit


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _stage_times(
    cfg: MimoConfig, world_size: int, gpu: GpuSpec, settings: PlannerSettings, overrides: Sequence[str]
) -> tuple[StageTime, ...]:
    """Every stage of the schedule, each estimated from its own recipe when the schedule names one (with this
    run's overrides, except those the stage's recipe entry sets itself), else from this recipe."""
    schedule, _ = _schedule(cfg, world_size)
    times = []
    for stage in cfg.schedule.stages:
        stage_cfg = cfg
        if stage.recipe and stage.name != schedule.stage:
            name, *stage_overrides = stage.recipe.split()
            own_keys = {_override_key(item) for item in stage_overrides}
            shared = [item for item in overrides if _override_key(item) not in own_keys]
            try:
                stage_cfg = load_config([*shared, *stage_overrides], config_name=name)
            except ConfigError as err:
                raise PlanError(
                    f"schedule stage {stage.name!r} names recipe {stage.recipe!r}, which fails: {err}"
                ) from err
        stage_schedule, unit = _schedule(stage_cfg, world_size)
        start, end = schedule.stages[stage.name]
        speed = tokens_per_second(stage_cfg.model, stage_cfg.train.seq_length, world_size, gpu, settings.mfu)
        times.append(
            StageTime(
                name=stage.name,
                recipe=stage.recipe,
                start_tokens=start,
                end_tokens=end,
                seq_length=stage_cfg.train.seq_length,
                tokens_per_s=speed,
                days=(end - start) / speed / SECONDS_PER_DAY,
                steps=stage_schedule.steps_between(start, end) if unit is not None else None,
                current=stage.name == schedule.stage,
            )
        )
    return tuple(times)


FULL_RECOMPUTE = Recompute(granularity="full", method="uniform", num_layers=1)
SELECTIVE_RECOMPUTE = Recompute(granularity="selective", modules=("layernorm", "moe_act"))


@dataclass(frozen=True)
class _Change:
    label: str
    values: dict[str, object] = field(default_factory=dict)
    """Dotted config keys and their new values."""
    recompute: Recompute | None = None


def _candidate_changes(cfg: MimoConfig) -> list[_Change]:
    """Single changes that lower the memory per GPU."""
    p, t = cfg.parallel, cfg.train
    changes = [
        _Change(f"parallel.{key}={getattr(p, key) * 2}", {f"parallel.{key}": getattr(p, key) * 2})
        for key in ("pp", "ep", "tp", "cp")
    ]
    if t.micro_batch_size > 1:
        half = t.micro_batch_size // 2
        changes.append(_Change(f"train.micro_batch_size={half}", {"train.micro_batch_size": half}))
    if not p.distributed_optimizer:
        changes.append(_Change("parallel.distributed_optimizer=true", {"parallel.distributed_optimizer": True}))
    if p.vpp is not None:
        changes.append(_Change("parallel.vpp=null", {"parallel.vpp": None}))
    current = recompute_of(cfg)
    for option in (FULL_RECOMPUTE, SELECTIVE_RECOMPUTE):
        if option.granularity != current.granularity:
            changes.append(_Change(f"{_describe_recompute(option)} activation recomputation", recompute=option))
    return changes


def _with_changes(cfg: MimoConfig, values: dict[str, object]) -> MimoConfig:
    sections: dict[str, dict[str, object]] = {}
    for key, value in values.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    return replace(cfg, **{s: replace(getattr(cfg, s), **v) for s, v in sections.items()})


def suggest(
    cfg: MimoConfig, *, world_size: int, gpu: GpuSpec, settings: PlannerSettings = PlannerSettings()
) -> tuple[Suggestion, ...]:
    """Each single change (and twice the GPUs) that gives a valid layout, with the peak it leads to; the ones
    that fit first."""
    options = []
    for change in _candidate_changes(cfg):
        try:
            estimate = estimate_memory(
                _with_changes(cfg, change.values),
                world_size=world_size,
                gpu=gpu,
                settings=settings,
                recompute=change.recompute,
            )
        except PlanError:
            continue
        options.append(Suggestion(change.label, estimate.peak.total, estimate.fits))
    try:
        estimate = estimate_memory(cfg, world_size=2 * world_size, gpu=gpu, settings=settings)
        options.append(Suggestion(f"--world-size {2 * world_size}", estimate.peak.total, estimate.fits))
    except PlanError:
        pass
    return tuple(sorted(options, key=lambda option: (not option.fits, option.peak_bytes)))


# ------------------------------------------------------------------------------------------------- output


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _tokens(value: float) -> str:
    for suffix, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if value >= size:
            return f"{value / size:.4g}{suffix}"
    return f"{value:.0f}"


def _count(value: float) -> str:
    """Parameter counts as the report writes them: 309.11B, 1.23M."""
    for suffix, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if value >= size:
            return f"{value / size:.2f}{suffix}"
    return f"{value:.0f}"


def _layers(layers: Sequence[int]) -> str:
    if not layers:
        return "-"
    runs, start = [], layers[0]
    for previous, current in zip(layers, list(layers[1:]) + [None]):
        if current != previous + 1:
            runs.append(f"{start}" if start == previous else f"{start}-{previous}")
            start = current
    return ",".join(runs)


MEMORY_ROWS = (
    ("weights", "weights"),
    ("gradients", "gradients (fp32)"),
    ("optimizer", "optimizer states"),
    ("activations", "activations"),
    ("moe_dispatch", "MoE dispatch buffers"),
    ("logits", "logits and loss"),
    ("reserved", "reserved"),
)


def format_plan(plan: Plan) -> str:
    lay, gpu = plan.layout, plan.gpu
    lines = [
        f"mimo-plan: {plan.recipe} {' '.join(plan.overrides)}".rstrip(),
        f"  on {plan.world_size} x {gpu.name} ({gpu.memory_gib:.1f} GiB, {gpu.bf16_tflops:g} dense BF16 TFLOP/s)",
        f"layout     tp {lay.tp}  pp {lay.pp}  vpp {lay.vpp or '-'}  cp {lay.cp}  ep {lay.ep}  etp {lay.etp}"
        f"  |  dp {lay.dp}  expert-dp {lay.expert_dp}  |  sequence parallel {'on' if lay.sequence_parallel else 'off'}",
        f"           {lay.num_microbatches} micro-batches per rank per step at the full batch",
        f"recompute  {_describe_recompute(plan.recompute)}",
        f"model      {_count(plan.params.total)} parameters ({_count(plan.params.mtp)} of them MTP),"
        f" {_count(plan.params.active)} active per token",
        "",
    ]
    stages = plan.memory.stages
    width = max(7, *(len(_layers(s.layers)) + 2 for s in stages))

    def row(label: str, cells: Sequence[str]) -> str:
        return f"{label:<28}" + "".join(f"{cell:>{width}}" for cell in cells)

    lines += [
        row("memory per GPU (GiB)", []) + "  by pipeline stage",
        row("  pipeline stage", [str(s.stage) for s in stages]),
        row("  decoder layers", [_layers(s.layers) for s in stages]),
        row("  micro-batches in flight", [str(s.in_flight) for s in stages]),
    ]
    for key, label in MEMORY_ROWS:
        lines.append(row("  " + label, [_gib(getattr(s, key)) for s in stages]))
    lines.append(row("  total", [_gib(s.total) for s in stages]))
    lines.append("")
    flops = plan.flops
    lines += [
        f"compute    forward {flops.forward:.3e} FLOPs/token: attention projections {flops.attention_projections:.3e},"
        f" attention scores {flops.attention_scores:.3e} (GA causal, SWA within the window),",
        f"           dense FFN {flops.dense_mlp:.3e}, experts {flops.experts:.3e}, routers {flops.routers:.3e},"
        f" LM head {flops.lm_head:.3e}, MTP {flops.mtp + flops.mtp_attention_scores:.3e}",
        f"           training (forward + backward, recomputation not counted) {flops.training:.3e} FLOPs/token",
        f"           at MFU {plan.mfu:g}: {plan.tokens_per_s:,.0f} tokens/s, {plan.step_seconds:.1f} s per step of"
        f" {plan.step_tokens:,} tokens",
        "",
        f"{'training stage':<16}{'tokens':>20}{'seq':>10}{'steps':>12}{'tokens/s':>14}{'days':>10}  recipe",
    ]
    for stage in plan.stages:
        span = f"{_tokens(stage.start_tokens)}-{_tokens(stage.end_tokens)}"
        steps = f"{stage.steps:,}" if stage.steps is not None else "?"
        marker = "  <- this run" if stage.current else ""
        lines.append(
            f"{stage.name:<16}{span:>20}{stage.seq_length:>10,}{steps:>12}{stage.tokens_per_s:>14,.0f}"
            f"{stage.days:>10.1f}  {stage.recipe or plan.recipe}{marker}"
        )
    lines += ["", f"{'communication per step and GPU':<40}{'group':>6}{'GiB':>10}{'off-node':>10}{'seconds':>10}"]
    for item in plan.traffic:
        lines.append(
            f"  {item.kind:<38}{item.group_size:>6}{_gib(item.bytes):>10}"
            f"{item.between_nodes:>10.0%}{item.seconds:>10.1f}"
        )
    if not plan.traffic:
        lines.append("  none (a single rank)")
    lines += ["  (seconds: at the link bandwidth with no overlap; compare with the step time above)", ""]
    lines += _verdict(plan)
    return "\n".join(lines)


def _describe_recompute(recompute: Recompute) -> str:
    if recompute.granularity == "full":
        return f"full ({recompute.method or 'uniform'}, {recompute.num_layers} layer(s))"
    if recompute.granularity == "selective":
        return "selective: " + ", ".join(recompute.modules)
    return "none"


def _verdict(plan: Plan) -> list[str]:
    peak, capacity = plan.memory.peak, plan.memory.capacity
    lines = []
    if plan.memory.fits:
        return lines + [
            f"fits: the fullest stage ({peak.stage}) needs {_gib(peak.total)} GiB,"
            f" {_gib(capacity - peak.total)} GiB to spare on a {plan.gpu.name}"
        ]
    lines += [
        f"DOES NOT FIT: stage {peak.stage} needs {_gib(peak.total)} GiB, {_gib(peak.total - capacity)} GiB more than"
        f" the {_gib(capacity)} GiB of a {plan.gpu.name} ({_gib(peak.reserved)} GiB of it kept in reserve).",
    ]
    largest = sorted(MEMORY_ROWS[:-1], key=lambda row: getattr(peak, row[0]), reverse=True)[:2]
    lines.append("  largest parts: " + ", ".join(f"{label} {_gib(getattr(peak, key))} GiB" for key, label in largest))
    fitting = [s for s in plan.suggestions if s.fits]
    others = [s for s in plan.suggestions if not s.fits]
    if fitting:
        lines.append("  changes that make it fit (peak GiB):")
        lines += [f"    {s.change}  ->  {_gib(s.peak_bytes)}" for s in fitting]
    if others:
        lines.append(
            "  changes that help but do not fit alone (peak GiB): "
            + "; ".join(f"{s.change} -> {_gib(s.peak_bytes)}" for s in others)
        )
    if not plan.suggestions:
        lines.append("  no single change gives a valid layout; use more GPUs or a GPU with more memory")
    return lines


def plan_to_json(plan: Plan) -> dict[str, object]:
    data = asdict(plan)
    data["step_seconds"] = plan.step_seconds
    data["flops"].update(forward=plan.flops.forward, training=plan.flops.training)
    data["params"].update(total=plan.params.total, active=plan.params.active)
    for stage, raw in zip(plan.memory.stages, data["memory"]["stages"]):
        raw["total"] = stage.total
    data["memory"].update(peak_stage=plan.memory.peak.stage, peak_bytes=plan.memory.peak.total, fits=plan.memory.fits)
    data["runs"] = plan.runs
    return data


# ---------------------------------------------------------------------------------------------------- CLI


def smallest_world_size(cfg: MimoConfig) -> int:
    """The fewest ranks the layout's degrees allow (dense and expert groups both whole)."""
    p = cfg.parallel
    return math.lcm(p.tp * p.pp * p.cp, p.etp * p.ep * p.pp)


def main(argv: Sequence[str] | None = None) -> int:
    parser = recipe_argument_parser(
        "mimo-plan", "Memory, time and communication of a recipe on a cluster, before launching it."
    )
    parser.add_argument(
        "--world-size", type=int, default=None, help="GPUs of the run (default: the fewest the layout allows)"
    )
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    parser.add_argument(
        "--mfu",
        type=float,
        default=PlannerSettings.mfu,
        help=f"model-FLOPs utilisation for the time estimates (default {PlannerSettings.mfu})",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=PlannerSettings.backend,
        help="modules the activation estimate assumes: te (GPU with Transformer Engine) or local (mimo's CPU modules)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_intermixed_args(argv)
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu {args.mfu} must be in (0, 1]")
    try:
        cfg = load_config(args.overrides, config_name=args.config_name)
    except ConfigError as err:
        parser.error(str(err))
    world_size = args.world_size or smallest_world_size(cfg)
    try:
        plan = make_plan(
            cfg,
            world_size=world_size,
            gpu=GPUS[args.gpu],
            settings=PlannerSettings(mfu=args.mfu, backend=args.backend),
            recipe=args.config_name,
            overrides=args.overrides,
        )
    except PlanError as err:
        parser.error(str(err))
    if args.json:
        print(json.dumps(plan_to_json(plan), indent=2))
    else:
        print(format_plan(plan))
        if args.world_size is None:
            print(f"(world size {world_size}: the fewest GPUs this layout allows; pass --world-size for your cluster)")
    return 0 if plan.runs else 1


if __name__ == "__main__":
    sys.exit(main())
