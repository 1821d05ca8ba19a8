"""Memory per GPU by part and pipeline stage, the estimate ``mimo-plan`` fits a layout against.

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

from dataclasses import dataclass

from mimo.parallel.layout import ResolvedLayout
from mimo.recipes.schema import MimoConfig
from mimo.train.tools.plan.activations import (
    Recompute,
    Shape,
    chunk_activations,
    dispatched_rows,
    in_flight_micro_batches,
    last_stage_extras,
    recompute_of,
)
from mimo.train.tools.plan.parameters import stage_params
from mimo.train.tools.plan.settings import (
    BACKENDS,
    BYTES,
    FP32,
    GIB,
    GPUS,
    GpuSpec,
    PlanError,
    PlannerSettings,
    resolve_layout,
)

ADAM_MOMENTS = 2


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
    shape = Shape(
        batch=cfg.train.micro_batch_size,
        seq=cfg.train.seq_length // layout.cp,
        cp=layout.cp,
        tp=layout.tp,
        sp=layout.sequence_parallel,
        etp=layout.etp,
        act_bytes=param_bytes,
        backend=settings.backend,
        window_exchange=cfg.parallel.cp_window_exchange,
    )
    stages = []
    for rank in range(layout.pp):
        params = stage_params(model, layout, rank)
        dense = params.tensor_parallel / layout.tp + params.replicated
        experts = params.experts / (layout.ep * layout.etp)
        fp8_copies = 0.0
        if cfg.precision.fp8:
            fp8_copies = 2 * BYTES["fp8"] * (params.fp8_tensor_parallel / layout.tp + experts)
        own_chunks = layout.rank_chunks(rank)
        kept, remat = zip(*(chunk_activations(model, chunk, shape, recompute) for chunk in own_chunks))
        in_flight = in_flight_micro_batches(layout, rank)
        activations = in_flight * max(kept) + max(remat)
        logits = 0.0
        if rank == layout.pp - 1:
            extra, logits = last_stage_extras(model, shape, recompute)
            activations += extra
        moe_layers = [layer for chunk in own_chunks for layer in chunk if model.is_moe(layer)]
        dispatch = 2 * dispatched_rows(model, shape) * model.hidden_size * shape.act_bytes if moe_layers else 0.0
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
