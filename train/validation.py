"""Validation during training: ``mimo-eval``'s metrics (``mimo.train.evaluation``) on the run's validation split,
every ``eval.interval`` steps and at the end of each schedule stage.

Every validation scores the same sequences, the first ``eval.iters`` global batches of the validation split, so
the values of two steps differ by what the model learnt, not by which samples were drawn. Validation never
changes training: it reads its own data iterator, runs forward only in eval mode (no expert-bias counts, no
aux-loss or MTP-loss tracking), and every random-number state training uses is put back afterwards.
"""

import contextlib
import logging
import random
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from mimo.recipes.errors import ConfigError
from mimo.recipes.schema import MimoConfig
from mimo.train.build import chunk_iterators
from mimo.train.evaluation import evaluation_mode, forward_only_sums, num_sums, sum_over_ranks, summarize
from mimo.train.step import Batch, MicroBatching

logger = logging.getLogger("mimo")

VALIDATION_PREFIX = "val_"


def check_validation(cfg: MimoConfig) -> None:
    """Validation must find its samples in the split: each one scores ``eval.iters`` global batches."""
    cfg.eval.validate()
    needed = cfg.eval.iters * cfg.train.global_batch_size
    if cfg.eval.interval and needed > cfg.data.valid_samples:
        raise ConfigError(
            f"eval.iters={cfg.eval.iters} batches of train.global_batch_size={cfg.train.global_batch_size} need "
            f"{needed} validation samples but data.valid_samples={cfg.data.valid_samples}; raise data.valid_samples "
            "or lower eval.iters (eval.interval=0 turns validation off)"
        )


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Every random-number state training draws from is the same after the block as before it: torch's default
    generators (CPU and CUDA), megatron's model-parallel tracker, Python's and NumPy's (starting a DataLoader
    iteration draws a seed from torch's)."""
    tracker = get_cuda_rng_tracker()
    states = (torch.get_rng_state(), tracker.get_states(), random.getstate(), np.random.get_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        cpu, tracked, python, numpy = states
        torch.set_rng_state(cpu)
        tracker.set_states(tracked)
        random.setstate(python)
        np.random.set_state(numpy)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class Validator:
    """Scores the model chunks on the validation split; ``due`` says when, ``run`` returns the logged values."""

    def __init__(
        self, cfg: MimoConfig, chunks: Sequence[torch.nn.Module], valid: Iterable[Batch] | None, dp: int
    ) -> None:
        self.interval = cfg.eval.interval if valid is not None else 0
        if cfg.eval.interval and valid is None:
            logger.warning("no validation split (data.split=%r): validation is off", cfg.data.split)
        self.iters = cfg.eval.iters
        self.chunks = chunks
        self.valid = valid
        micro = cfg.train.micro_batch_size
        self.batching = MicroBatching(cfg.train.global_batch_size // (micro * dp), micro, cfg.train.seq_length)
        self.depths = cfg.model.mtp_num_layers

    def due(self, step: int, stage_end: bool) -> bool:
        return bool(self.interval) and (step % self.interval == 0 or stage_end)

    def run(self, device: torch.device) -> dict[str, float]:
        totals = torch.zeros(num_sums(self.depths), dtype=torch.float64)
        with preserved_rng(), evaluation_mode(self.chunks):
            iterators = chunk_iterators(iter(self.valid), len(self.chunks))
            for _ in range(self.iters):
                totals += forward_only_sums(self.chunks, iterators, self.batching, self.depths, device)
        metrics = summarize(sum_over_ranks(totals, device), self.depths)
        values = {"loss": metrics.loss, "ppl": metrics.perplexity}
        if self.depths:
            values |= {"mtp_loss": metrics.mtp_loss, "mtp_acceptance": metrics.mtp_acceptance}
        return {VALIDATION_PREFIX + key: value for key, value in values.items()}
