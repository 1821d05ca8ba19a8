"""Checks a parallel layout against the model and the world size before any process group exists.

megatron-core finds most of these problems too, but late (after minutes of start-up on a large job) and with
messages that name its internal arguments. Here every rule is checked up front, as a pure function the planner
and tests can call without torch.distributed, and each error names the numbers involved and the config key to
change.
"""

from dataclasses import dataclass

from mimo.model.config import ModelConfig
from mimo.parallel.config import CP_WINDOW_EXCHANGES, ParallelConfig
from mimo.recipes.errors import MimoError


class LayoutError(MimoError, ValueError):
    """A parallel layout that cannot run this model on this many ranks."""


@dataclass(frozen=True)
class ResolvedLayout:
    """Every degree of the layout, including those the world size implies."""

    world_size: int
    tp: int
    pp: int
    vpp: int | None
    cp: int
    ep: int
    etp: int
    dp: int
    """Data-parallel replicas of the dense (non-expert) part: world / (tp * pp * cp)."""
    expert_dp: int
    """Data-parallel replicas of each expert: world / (etp * ep * pp)."""
    sequence_parallel: bool
    num_microbatches: int
    """Micro-batches each data-parallel rank runs per optimizer step."""
    stage_layers: tuple[int, ...]
    """Decoder layers on each pipeline stage (MTP blocks come on top of the last one)."""

    def chunk_layers(self) -> list[list[int]]:
        """The decoder layers of each model chunk in execution order, megatron's placement: chunk c (virtual
        stage c // pp of pipeline rank c % pp) holds ``stage_layers[c % pp] / vpp`` consecutive layers, after
        those of every earlier chunk."""
        vpp = self.vpp or 1
        chunks, start = [], 0
        for chunk in range(self.pp * vpp):
            size = self.stage_layers[chunk % self.pp] // vpp
            chunks.append(list(range(start, start + size)))
            start += size
        return chunks

    def rank_chunks(self, rank: int) -> list[list[int]]:
        """The layers of each model chunk pipeline rank ``rank`` holds, in its virtual-stage order."""
        return self.chunk_layers()[rank :: self.pp]

    def rank_layers(self, rank: int) -> list[int]:
        """Every decoder layer pipeline rank ``rank`` holds, over all its virtual stages."""
        return [layer for chunk in self.rank_chunks(rank) for layer in chunk]


def validate_layout(
    parallel: ParallelConfig,
    model: ModelConfig,
    world_size: int,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    seq_length: int,
) -> ResolvedLayout:
    """Resolve the implied degrees of a layout, or raise LayoutError naming what to change."""
    _check_degrees(parallel, world_size)
    dp = _data_parallel_size(parallel, world_size)
    expert_dp = _check_experts(parallel, model, world_size)
    _check_tensor_parallel(parallel, model)
    sequence_parallel = _resolve_sequence_parallel(parallel, model)
    _check_sequence_split(parallel, sequence_parallel, seq_length)
    stage_layers = _split_layers(parallel, model)
    num_microbatches = _num_microbatches(parallel, dp, global_batch_size, micro_batch_size)
    return ResolvedLayout(
        world_size=world_size,
        tp=parallel.tp,
        pp=parallel.pp,
        vpp=parallel.vpp,
        cp=parallel.cp,
        ep=parallel.ep,
        etp=parallel.etp,
        dp=dp,
        expert_dp=expert_dp,
        sequence_parallel=sequence_parallel,
        num_microbatches=num_microbatches,
        stage_layers=stage_layers,
    )


def _has_moe(model: ModelConfig) -> bool:
    return bool(model.num_experts) and model.num_moe_layers > 0


def _check_degrees(parallel: ParallelConfig, world_size: int) -> None:
    if world_size < 1:
        raise LayoutError(f"world size is {world_size}; launch at least one process")
    for key in ("tp", "pp", "cp", "ep", "etp"):
        value = getattr(parallel, key)
        if value < 1:
            raise LayoutError(f"parallel.{key}={value} must be at least 1 (1 means no {key} parallelism)")
    if parallel.vpp is not None and parallel.vpp < 1:
        raise LayoutError(f"parallel.vpp={parallel.vpp} must be at least 1, or null for no interleaving")
    if parallel.cp_window_exchange not in CP_WINDOW_EXCHANGES:
        raise LayoutError(
            f"parallel.cp_window_exchange={parallel.cp_window_exchange!r} is not one of"
            f" {', '.join(CP_WINDOW_EXCHANGES)}"
        )


def _check_sequence_split(parallel: ParallelConfig, sequence_parallel: bool, seq_length: int) -> None:
    """Each context-parallel rank holds two equal chunks of every sequence (megatron's load-balanced split), and
    sequence parallelism splits a rank's tokens evenly over its tensor-parallel ranks."""
    if parallel.cp > 1 and seq_length % (2 * parallel.cp):
        raise LayoutError(
            f"train.seq_length={seq_length} is not divisible by 2 * parallel.cp = {2 * parallel.cp}: each"
            " context-parallel rank holds two equal chunks of every sequence; pick a seq_length that is a multiple"
            f" of {2 * parallel.cp} or another parallel.cp"
        )
    local_tokens = seq_length // parallel.cp
    if sequence_parallel and local_tokens % parallel.tp:
        raise LayoutError(
            f"sequence parallelism splits the {local_tokens} tokens of a sequence on each context-parallel rank"
            f" (train.seq_length={seq_length} / parallel.cp={parallel.cp}) over parallel.tp={parallel.tp} ranks;"
            f" pick a seq_length that is a multiple of {parallel.tp * parallel.cp * (2 if parallel.cp > 1 else 1)}"
        )


def _data_parallel_size(parallel: ParallelConfig, world_size: int) -> int:
    model_parallel = parallel.tp * parallel.pp * parallel.cp
    if world_size % model_parallel:
        raise LayoutError(
            f"world size {world_size} is not divisible by tp * pp * cp = {parallel.tp} * {parallel.pp} *"
            f" {parallel.cp} = {model_parallel}; launch a multiple of {model_parallel} processes or lower"
            " parallel.tp / parallel.pp"
        )
    return world_size // model_parallel


def _check_experts(parallel: ParallelConfig, model: ModelConfig, world_size: int) -> int:
    """Expert layers re-slice the same ranks as etp * ep * expert_dp per pipeline stage (megatron's rule)."""
    if not _has_moe(model):
        if parallel.ep > 1 or parallel.etp > 1:
            raise LayoutError(
                f"parallel.ep={parallel.ep}, parallel.etp={parallel.etp} but the model has no MoE layers"
                f" (num_experts={model.num_experts}, per-layer FFN {model.moe_pattern()} with 1 = MoE); set"
                " parallel.ep=1 and parallel.etp=1"
            )
        return world_size // parallel.pp
    if model.num_experts % parallel.ep:
        raise LayoutError(
            f"parallel.ep={parallel.ep} does not divide model.num_experts={model.num_experts}; pick an ep that"
            f" divides {model.num_experts}"
        )
    expert_model_parallel = parallel.etp * parallel.ep * parallel.pp
    if world_size % expert_model_parallel:
        raise LayoutError(
            f"world size {world_size} is not divisible by etp * ep * pp = {parallel.etp} * {parallel.ep} *"
            f" {parallel.pp} = {expert_model_parallel}; expert layers need whole expert-data-parallel groups."
            " Lower parallel.ep / parallel.etp or launch a multiple of"
            f" {expert_model_parallel} processes"
        )
    if model.moe_ffn_hidden_size % parallel.etp:
        raise LayoutError(
            f"parallel.etp={parallel.etp} does not divide model.moe_ffn_hidden_size="
            f"{model.moe_ffn_hidden_size}; pick an etp that divides it"
        )
    return world_size // expert_model_parallel


def _check_tensor_parallel(parallel: ParallelConfig, model: ModelConfig) -> None:
    tp = parallel.tp
    fewest_kv_heads = min(model.num_key_value_heads, model.swa_num_key_value_heads)
    if tp > fewest_kv_heads:
        raise LayoutError(
            f"parallel.tp={tp} exceeds the fewest KV heads of any layer type ({fewest_kv_heads}:"
            f" num_key_value_heads={model.num_key_value_heads},"
            f" swa_num_key_value_heads={model.swa_num_key_value_heads}); KV heads are not replicated across"
            f" tensor-parallel ranks, so use parallel.tp <= {fewest_kv_heads}"
        )
    sizes = {
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_key_value_heads,
        "swa_num_key_value_heads": model.swa_num_key_value_heads,
        "ffn_hidden_size": model.ffn_hidden_size,
    }
    for key, size in sizes.items():
        if size % tp:
            raise LayoutError(f"parallel.tp={tp} does not divide model.{key}={size}; pick a tp that divides it")


def _resolve_sequence_parallel(parallel: ParallelConfig, model: ModelConfig) -> bool:
    if parallel.sequence_parallel is None:
        return parallel.tp > 1
    if parallel.sequence_parallel and parallel.tp == 1:
        raise LayoutError(
            "parallel.sequence_parallel=true needs parallel.tp > 1 (it splits the sequence over the"
            " tensor-parallel ranks); set it to null or raise parallel.tp"
        )
    if not parallel.sequence_parallel and parallel.tp > 1 and _has_moe(model):
        raise LayoutError(
            f"parallel.sequence_parallel=false with parallel.tp={parallel.tp}: megatron-core's MoE layers need"
            " sequence parallelism under tensor parallelism; set parallel.sequence_parallel to null (auto) or true"
        )
    return bool(parallel.sequence_parallel)


def _split_layers(parallel: ParallelConfig, model: ModelConfig) -> tuple[int, ...]:
    """Layers per pipeline stage, following megatron's uneven first/last stage rule."""
    pp, vpp, num_layers = parallel.pp, parallel.vpp, model.num_layers
    first, last = parallel.pipeline_first_stage_layers, parallel.pipeline_last_stage_layers
    if vpp is not None and pp == 1:
        raise LayoutError(
            f"parallel.vpp={vpp} needs parallel.pp > 1 (virtual stages interleave pipeline stages); set"
            " parallel.vpp to null or raise parallel.pp"
        )
    if pp > num_layers:
        raise LayoutError(
            f"parallel.pp={pp} exceeds model.num_layers={num_layers}; every stage needs at least one layer,"
            f" so use parallel.pp <= {num_layers}"
        )
    if pp == 1 and (first is not None or last is not None):
        raise LayoutError(
            "parallel.pipeline_first_stage_layers / pipeline_last_stage_layers need parallel.pp > 1; set them to null"
        )
    for key, count in (("pipeline_first_stage_layers", first), ("pipeline_last_stage_layers", last)):
        if count is not None and count < 1:
            raise LayoutError(f"parallel.{key}={count} must be at least 1, or null for an even split")
    middle_layers = num_layers - (first or 0) - (last or 0)
    middle_stages = pp - (first is not None) - (last is not None)
    uneven = "".join(
        f", parallel.{key}={count}"
        for key, count in (("pipeline_first_stage_layers", first), ("pipeline_last_stage_layers", last))
        if count is not None
    )
    if middle_stages == 0 and middle_layers != 0:
        raise LayoutError(
            f"the first and last pipeline stages hold {num_layers - middle_layers} layers but"
            f" model.num_layers={num_layers} (parallel.pp={pp}{uneven}); with no middle stage they must add up to"
            f" {num_layers}"
        )
    if middle_stages and (middle_layers < middle_stages or middle_layers % middle_stages):
        raise LayoutError(
            f"{middle_layers} layers cannot be split evenly over {middle_stages} pipeline stages"
            f" (model.num_layers={num_layers}, parallel.pp={pp}{uneven}); change parallel.pp or set"
            " parallel.pipeline_first_stage_layers / pipeline_last_stage_layers"
        )
    per_middle = middle_layers // middle_stages if middle_stages else 0
    stage_layers: list[int] = [per_middle] * pp
    if first is not None:
        stage_layers[0] = first
    if last is not None:
        stage_layers[-1] = last
    if vpp is not None:
        for stage, count in enumerate(stage_layers):
            if count % vpp:
                raise LayoutError(
                    f"pipeline stage {stage} holds {count} layers, not divisible by parallel.vpp={vpp}; each"
                    " virtual stage needs the same number of layers. Change parallel.vpp or the stage split"
                )
    return tuple(stage_layers)


def _num_microbatches(parallel: ParallelConfig, dp: int, global_batch_size: int, micro_batch_size: int) -> int:
    if micro_batch_size < 1 or global_batch_size < 1:
        raise LayoutError(
            f"global_batch_size={global_batch_size} and micro_batch_size={micro_batch_size} must be at least 1"
        )
    per_step = micro_batch_size * dp
    if global_batch_size % per_step:
        raise LayoutError(
            f"global_batch_size={global_batch_size} is not divisible by micro_batch_size * dp ="
            f" {micro_batch_size} * {dp} = {per_step}; use a global batch that is a multiple of {per_step}"
        )
    num_microbatches = global_batch_size // per_step
    if parallel.vpp is not None and num_microbatches % parallel.pp:
        raise LayoutError(
            f"the interleaved schedule (parallel.vpp={parallel.vpp}) needs the {num_microbatches} micro-batches"
            f" per step to be a multiple of parallel.pp={parallel.pp}; raise global_batch_size to a multiple of"
            f" {per_step * parallel.pp}"
        )
    return num_microbatches
