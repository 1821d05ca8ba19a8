"""One optimizer step: megatron-core's forward/backward schedule over the step's micro-batches, then the update.

Each micro-batch's loss is its token mean, averaged over the step's micro-batches and data-parallel ranks
(megatron's default reduction). With every token counted (the default data settings) that equals the mean over
the global batch on every layout. With data.eod_mask_loss=true micro-batches count different numbers of tokens
and the weighting depends on how the layout splits the batch; megatron's per-token mode would fix that, but in
megatron-core 0.16.1 it scales the router's aux loss by each rank's local token count, which is layout-dependent.
"""

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
from megatron.core.utils import get_batch_on_this_cp_rank

from mimo.data.documents import DOCUMENTS
from mimo.parallel.context_parallel import sum_over_context_parallel
from mimo.train.fault.guard import ExpertBiasSnapshot, local_gradients_finite

Batch = dict[str, torch.Tensor]
MODEL_INPUTS = ("tokens", "labels", "loss_mask", "position_ids")
REDUCED_METRICS = 5
"""LM loss sum and token count, MTP loss sum, MTP loss holders, aux loss: the head of the all-reduced vector."""


@dataclass
class StepResult:
    lm_loss: float
    mtp_loss: float
    aux_loss: float
    loss: float
    grad_norm: float
    """NaN when the update was skipped before the norm was taken."""
    update_skipped: bool
    tokens: int
    """Tokens the loss was computed on, over the whole global batch."""
    nonfinite_gradient_ranks: tuple[int, ...] = ()
    """Global ranks whose reduced gradients held a NaN or infinity."""


def _nothing(*args) -> None:
    pass


@dataclass(frozen=True)
class StepHooks:
    """What the training loop plugs into a step; the defaults run the step as megatron-core would."""

    on_micro_batch: Callable[[], None] = _nothing
    """Called as each micro-batch is drawn (progress of long steps)."""
    approve: Callable[[StepResult], bool] = field(default=lambda result: True)
    """Called on every rank with the step's all-reduced losses and gradient flags before the update; False skips
    the update and leaves the model, the optimizer and the expert biases as they were (mimo.train.fault)."""
    corrupt_batch: Callable[[Batch], Batch] = field(default=lambda batch: batch)
    """Fault injection (mimo.train.fault.injection): sees each micro-batch before the model does."""
    corrupt_gradients: Callable[[Sequence[torch.nn.Module]], None] = _nothing
    """Fault injection: sees the reduced gradients before the guard does."""


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """megatron divides the returned sum by the returned count. Under context parallelism the sum is rescaled so
    that this amounts to dividing by the sequence's token count / cp: with masked tokens (data.eod_mask_loss)
    the ranks' counts differ, and dividing by its own would weigh one rank's tokens more than another's."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (output_tensor.float().reshape(-1) * mask).sum()
    count = mask.sum()
    num_tokens = count.to(torch.int)
    cp = parallel_state.get_context_parallel_world_size()
    scaled = loss_sum
    if cp > 1:
        sequence_count = sum_over_context_parallel(count, parallel_state.get_context_parallel_group())
        scaled = loss_sum * count.clamp(min=1) * cp / sequence_count.clamp(min=1)
    return scaled, num_tokens, {"lm_loss": torch.stack([loss_sum.detach(), count])}


def forward_step(device: torch.device, hooks: StepHooks, data_iterator: Iterator[Batch], model: torch.nn.Module):
    """Every pipeline stage reads the same micro-batch so all iterators advance in lockstep; a context-parallel
    rank keeps its two load-balanced chunks of each sequence (positions included, so RoPE sees true ones) and the
    document ids of the whole sequence (``document_ids``)."""
    batch = hooks.corrupt_batch(next(data_iterator))
    hooks.on_micro_batch()
    local = get_batch_on_this_cp_rank({key: batch[key].to(device, non_blocking=True) for key in MODEL_INPUTS})
    tokens, labels, loss_mask, position_ids = (local[key] for key in MODEL_INPUTS)
    output = model(
        input_ids=tokens,
        position_ids=position_ids,
        attention_mask=document_ids(batch, device),
        labels=labels,
        loss_mask=loss_mask,
    )
    return output, partial(_loss_func, loss_mask)


def document_ids(batch: Batch, device: torch.device) -> torch.Tensor | None:
    """The micro-batch's document ids for the model (``attention_mask``), None without document masking."""
    documents = batch.get(DOCUMENTS)
    return None if documents is None else documents.to(device, non_blocking=True)


def _tracked_aux_loss(config: TransformerConfig) -> torch.Tensor:
    """This rank's MoE aux losses summed over its layers and micro-batches, weighted by the coefficient."""
    total = torch.zeros(())
    for name, entry in get_moe_layer_wise_logging_tracker().items():
        if name.endswith("load_balancing_loss"):
            total = total + entry["values"].detach().float().sum().cpu() * config.moe_aux_loss_coeff
    return total


def _tracked_mtp_loss() -> torch.Tensor:
    """This rank's MTP loss (per-micro-batch means summed over micro-batches and MTP depths)."""
    values = MTPLossLoggingHelper.tracker.get("values")
    return torch.zeros(()) if values is None else values.detach().float().sum().cpu()


@dataclass(frozen=True)
class _ReducedStep:
    lm_loss: float
    mtp_loss: float
    aux_loss: float
    tokens: int
    nonfinite_gradient_ranks: tuple[int, ...]


def _reduce_step_metrics(
    losses: list[dict], config: TransformerConfig, num_microbatches: int, gradients_finite: bool
) -> _ReducedStep:
    """Average the step's losses over the whole job, and tell every rank whose gradients are not finite.

    Ranks that hold the loss (last pipeline stage) contribute sums and counts, all others zeros. Sums and
    counts are duplicated alike across tensor-parallel ranks, so their ratio is exact after one all-reduce.
    Each rank also sets its own slot of a world-sized flag vector in the same all-reduce.
    """
    lm = torch.stack([entry["lm_loss"].float().cpu() for entry in losses]).sum(0) if losses else torch.zeros(2)
    is_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    mtp_sum = _tracked_mtp_loss() if is_last else torch.zeros(())
    holders = torch.tensor(1.0 if is_last else 0.0)
    flags = torch.zeros(dist.get_world_size())
    flags[dist.get_rank()] = 0.0 if gradients_finite else 1.0
    vector = torch.cat([torch.stack([lm[0], lm[1], mtp_sum, holders, _tracked_aux_loss(config)]), flags])
    vector = vector.to(torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
    dist.all_reduce(vector)
    vector = vector.cpu()
    lm_loss = (vector[0] / vector[1].clamp(min=1)).item()
    mtp_loss = (vector[2] / vector[3].clamp(min=1) / num_microbatches).item()
    # Each data-parallel replica computes every layer's aux loss on its own batch: average over the replicas.
    # Tensor-parallel ranks are not replicas here: under sequence parallelism each holds the part of the loss
    # of its own tokens, and those parts add up.
    replicas = parallel_state.get_data_parallel_world_size()
    aux_loss = (vector[4] / replicas / num_microbatches).item()
    # Tensor-parallel ranks of the last stage all count the same tokens. A corrupted loss mask makes the count NaN:
    # the step must still reach the numerical guard, which skips it.
    count = vector[1].item() / parallel_state.get_tensor_model_parallel_world_size()
    tokens = int(round(count)) if math.isfinite(count) else 0
    nonfinite = tuple(int(rank) for rank in torch.nonzero(vector[REDUCED_METRICS:]).flatten().tolist())
    return _ReducedStep(lm_loss, mtp_loss, aux_loss, tokens, nonfinite)


@dataclass(frozen=True)
class MicroBatching:
    """How one optimizer step's global batch is cut: micro-batches per data-parallel rank, and their shape."""

    num_microbatches: int
    micro_batch_size: int
    seq_length: int


def train_step(
    model_chunks: Sequence[torch.nn.Module],
    optimizer: MegatronOptimizer,
    data_iterators: Sequence[Iterator[Batch]],
    batching: MicroBatching,
    device: torch.device,
    hooks: StepHooks = StepHooks(),
) -> StepResult:
    """Forward and backward over the step's micro-batches (megatron's pipeline schedule for the layout), then,
    if ``hooks.approve`` agrees, the optimizer update. The shared TransformerConfig of the chunks carries the
    scheduled loss weights."""
    config: TransformerConfig = model_chunks[0].config
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    expert_biases = ExpertBiasSnapshot(model_chunks)
    losses = get_forward_backward_func()(
        forward_step_func=partial(forward_step, device, hooks),
        data_iterator=list(data_iterators) if len(model_chunks) > 1 else data_iterators[0],
        model=list(model_chunks),
        num_microbatches=batching.num_microbatches,
        seq_length=batching.seq_length,
        micro_batch_size=batching.micro_batch_size,
        forward_only=False,
    )
    hooks.corrupt_gradients(model_chunks)
    reduced = _reduce_step_metrics(losses, config, batching.num_microbatches, local_gradients_finite(model_chunks))
    clear_aux_losses_tracker()
    if "values" in MTPLossLoggingHelper.tracker:  # only stages holding MTP blocks ever track a loss
        MTPLossLoggingHelper.clean_loss_in_tracker()
    mtp_weight = config.mtp_loss_scaling_factor if config.mtp_num_layers else 0.0
    result = StepResult(
        lm_loss=reduced.lm_loss,
        mtp_loss=reduced.mtp_loss,
        aux_loss=reduced.aux_loss,
        loss=reduced.lm_loss + mtp_weight * reduced.mtp_loss + reduced.aux_loss,
        grad_norm=float("nan"),
        update_skipped=True,
        tokens=reduced.tokens,
        nonfinite_gradient_ranks=reduced.nonfinite_gradient_ranks,
    )
    if not hooks.approve(result):
        expert_biases.restore()  # megatron moved them inside finalize_model_grads, before the update was refused
        return result
    update_successful, grad_norm, _ = optimizer.step()
    return replace(
        result,
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        update_skipped=not update_successful,
    )
