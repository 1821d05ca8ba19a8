"""The metrics of a model on held-out sequences, one implementation for ``mimo-eval`` and validation in training.

Per micro-batch, token-weighted sums (FP64) over the positions whose label is a real token (``loss_mask``):

- the main model's next-token cross-entropy (from FP32 logits) and its token count: ``loss`` is their ratio,
  ``perplexity`` = exp(loss);
- per MTP depth k (1 .. model.mtp_num_layers): the cross-entropy of the depth-k block predicting token t+1+k from
  position t, over the positions whose target lies in the same sequence, their count, and the accepted drafts:
  the depth-k draft argmax p_mtp_k(x_{t+1+k} | x_<=t+k) is accepted where it equals the main model's own greedy
  choice at position t+k, argmax p_main(x_{t+1+k} | x_<=t+k) (greedy self-speculative decoding, teacher-forced).
  ``mtp_loss`` and ``mtp_acceptance`` average the depths.

The logits never leave their ranks whole: each rank computes per-token cross-entropies and argmaxes on its own
vocabulary shard (tensor parallelism) and sequence chunks (context parallelism), and only those [b, s] vectors are
gathered, so evaluating costs the memory of a training forward even for 150K-token vocabularies at 32K context.
"""

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.utils import get_batch_on_this_cp_rank, get_pg_size

from mimo.parallel.context_parallel import gather_in_sequence_order
from mimo.train.step import MODEL_INPUTS, Batch, MicroBatching, document_ids

MAIN_SUMS = 2
"""CE sum and token count of the main model."""
SUMS_PER_DEPTH = 3
"""CE sum, token count and accepted drafts of one MTP depth."""


@dataclass(frozen=True)
class TokenPredictions:
    """One model head's per-position results over whole sequences, [b, s]."""

    cross_entropy: torch.Tensor
    greedy: torch.Tensor
    """The argmax token id."""


@dataclass
class EvalMetrics:
    loss: float
    perplexity: float
    tokens: int
    mtp_loss: float | None
    mtp_acceptance: float | None
    mtp_tokens: int
    mtp_loss_per_depth: list[float] = field(default_factory=list)
    mtp_acceptance_per_depth: list[float] = field(default_factory=list)


def num_sums(depths: int) -> int:
    return MAIN_SUMS + SUMS_PER_DEPTH * depths


def vocab_parallel_argmax(logits: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The argmax over the whole vocabulary of logits split along it over ``group`` (the first maximum, as
    ``torch.argmax`` of the gathered logits: ranks hold consecutive vocabulary ranges)."""
    local = logits.argmax(-1)
    size = get_pg_size(group)
    if size == 1:
        return local
    values = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1)
    offset = dist.get_rank(group) * logits.shape[-1]
    all_values = [torch.empty_like(values) for _ in range(size)]
    all_ids = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(all_values, values, group=group)
    dist.all_gather(all_ids, local + offset, group=group)
    best = torch.stack(all_values).argmax(0, keepdim=True)
    return torch.stack(all_ids).gather(0, best).squeeze(0)


def token_predictions(logits: torch.Tensor, targets: torch.Tensor) -> TokenPredictions:
    """Per-token CE against ``targets`` and argmax of this rank's [b, s, vocab / tp] logits (gathered over the
    tensor-parallel ranks, which all return the same). The argmax comes first: megatron's vocab-parallel CE
    overwrites FP32 logits in place."""
    greedy = vocab_parallel_argmax(logits, parallel_state.get_tensor_model_parallel_group())
    return TokenPredictions(vocab_parallel_cross_entropy(logits, targets), greedy)


def statistics(
    loss_mask: torch.Tensor,
    main: TokenPredictions,
    mtp: Sequence[TokenPredictions],
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sums over one micro-batch of whole sequences: [main CE, main tokens, then per MTP depth: CE, tokens,
    accepted drafts]. Depth k's predictions at position t hold the CE of target t+k (see ``depth_targets``). With
    document ids, depth k counts at t only when t+k is in t's document (the block read no other document)."""
    mask = loss_mask.double()
    values = [(main.cross_entropy.double() * mask).sum(), mask.sum()]
    for depth, draft in enumerate(mtp, start=1):
        counted = mask[:, depth:]
        if documents is not None:
            counted = counted * (documents[:, depth:] == documents[:, :-depth])
        accepted = (draft.greedy[:, :-depth] == main.greedy[:, depth:]).double() * counted
        values += [(draft.cross_entropy[:, :-depth].double() * counted).sum(), counted.sum(), accepted.sum()]
    return torch.stack(values)


def depth_targets(labels: torch.Tensor, positions: torch.Tensor, depth: int) -> torch.Tensor:
    """The label ``depth`` positions further on, for the local ``positions`` of whole-sequence ``labels`` (clamped
    at the sequence end: ``statistics`` drops those positions)."""
    return labels.gather(1, (positions + depth).clamp(max=labels.shape[1] - 1))


def _in_sequence_order(local: TokenPredictions, cp_group: dist.ProcessGroup) -> TokenPredictions:
    return TokenPredictions(
        gather_in_sequence_order(local.cross_entropy, cp_group, dim=1),
        gather_in_sequence_order(local.greedy, cp_group, dim=1),
    )


def forward_step(with_mtp: bool, device: torch.device, data_iterator: Iterator[Batch], model: torch.nn.Module):
    """megatron's forward step: a context-parallel rank runs its chunks of each sequence; the per-token results
    are gathered back into sequence order, since MTP acceptance compares positions in different chunks."""
    micro_batch = next(data_iterator)
    documents = document_ids(micro_batch, device)
    batch = {key: value.to(device) for key, value in micro_batch.items() if key in MODEL_INPUTS}
    batch["global_positions"] = torch.arange(batch["tokens"].shape[1], device=device).expand_as(batch["tokens"])
    local = get_batch_on_this_cp_rank(dict(batch))
    output = model(local["tokens"], local["position_ids"], documents, return_mtp_logits=with_mtp)

    def reduce(output_tensor):
        main, mtp = output_tensor if with_mtp else (output_tensor, [])
        cp_group = parallel_state.get_context_parallel_group()
        positions = local["global_positions"]
        heads = [token_predictions(main, local["labels"])] + [
            token_predictions(logits, depth_targets(batch["labels"], positions, depth))
            for depth, logits in enumerate(mtp, start=1)
        ]
        whole = [_in_sequence_order(head, cp_group) for head in heads]
        sums = statistics(batch["loss_mask"], whole[0], whole[1:], documents)
        return sums[0].clone().float(), sums[1].clone().int(), {"sums": sums}

    return output, reduce


def forward_only_sums(
    chunks: Sequence[torch.nn.Module],
    iterators: Sequence[Iterator[Batch]],
    batching: MicroBatching,
    depths: int,
    device: torch.device,
) -> torch.Tensor:
    """``statistics`` summed over one call of megatron's schedule (``batching.num_microbatches`` micro-batches of
    this data-parallel rank) on this rank; only the last pipeline stage has any."""
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=partial(forward_step, depths > 0, device),
            data_iterator=list(iterators) if len(chunks) > 1 else iterators[0],
            model=list(chunks),
            num_microbatches=batching.num_microbatches,
            seq_length=batching.seq_length,
            micro_batch_size=batching.micro_batch_size,
            forward_only=True,
        )
    totals = torch.zeros(num_sums(depths), dtype=torch.float64)
    for output in outputs:
        totals += output["sums"].cpu()
    return totals


def sum_over_ranks(totals: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's ``forward_only_sums`` added up, each sequence once: the tensor- and context-parallel ranks of
    the last stage all hold the same gathered results, data-parallel ranks different sequences."""
    if parallel_state.get_tensor_model_parallel_rank() != 0 or parallel_state.get_context_parallel_rank() != 0:
        totals = torch.zeros_like(totals)
    totals = totals.to(device)
    dist.all_reduce(totals)
    return totals.cpu()


def summarize(sums: torch.Tensor, depths: int) -> EvalMetrics:
    tokens = int(sums[1].item())
    loss = (sums[0] / max(tokens, 1)).item()
    per_depth = sums[MAIN_SUMS:].view(depths, SUMS_PER_DEPTH)
    mtp_losses = [(row[0] / row[1].clamp(min=1)).item() for row in per_depth]
    acceptance = [(row[2] / row[1].clamp(min=1)).item() for row in per_depth]
    return EvalMetrics(
        loss=loss,
        perplexity=math.exp(loss),
        tokens=tokens,
        mtp_loss=sum(mtp_losses) / depths if depths else None,
        mtp_acceptance=sum(acceptance) / depths if depths else None,
        mtp_tokens=int(per_depth[0, 1].item()) if depths else 0,
        mtp_loss_per_depth=mtp_losses,
        mtp_acceptance_per_depth=acceptance,
    )


@contextlib.contextmanager
def evaluation_mode(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """The chunks in eval mode for the block, back in the mode each had afterwards."""
    modes = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        yield
    finally:
        for chunk, training in zip(chunks, modes):
            chunk.train(training)
