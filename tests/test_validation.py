"""Validation during training never changes training, resumes exactly, and measures what mimo-eval measures.

The reference for the values is ``mimo-eval`` (``evaluate``) run on the checkpoint saved at the validated step,
given the same validation sequences, built here from the run's data config, not through the trainer. That
``mimo-eval`` itself measures what transformers computes is tests/test_evaluate.py's part; that every layout
gives one rank's values is tests/test_layouts.py's.
"""

import json
import random

import numpy as np
import pytest
import torch

from mimo.data import DataRank, build_data_iterators
from mimo.recipes import load_config
from mimo.recipes.errors import ConfigError
from mimo.train.tools.evaluate import Sequences, evaluate
from mimo.train.trainer import run_training
from mimo.train.validation import check_validation, preserved_rng

from layout_runs import checkpoint_tensors
from observed import observed_config

TRAINING_FIELDS = ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm", "lr", "moe_tokens_per_expert")
VALIDATION_FIELDS = ("val_loss", "val_ppl", "val_mtp_loss", "val_mtp_acceptance")


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def picked(records: list[dict], fields: tuple[str, ...]) -> list[dict]:
    return [{key: row[key] for key in ("step", *fields) if key in row} for row in records]


@pytest.mark.system
def test_validation_on_or_off_trains_bit_identically(tmp_path, data_cache, observed_run):
    off = run_training(observed_config(tmp_path, data_cache, "eval.interval=0", "profile.steps=[]"))
    assert off.losses == observed_run.summary.losses and off.grad_norms == observed_run.summary.grad_norms
    assert picked(rows(tmp_path), TRAINING_FIELDS) == picked(rows(observed_run.run_dir), TRAINING_FIELDS)
    assert not any("val_loss" in row for row in rows(tmp_path))
    with_validation = checkpoint_tensors(observed_run.run_dir / "checkpoints" / "step_0000004")
    without = checkpoint_tensors(tmp_path / "checkpoints" / "step_0000004")
    assert with_validation.keys() == without.keys()
    assert all(torch.equal(with_validation[key], without[key]) for key in without)


@pytest.mark.system
def test_a_resumed_run_validates_and_trains_as_the_uninterrupted_one(tmp_path, data_cache, observed_run):
    first = run_training(observed_config(tmp_path, data_cache, "train.stop_after_steps=2"))
    second = run_training(observed_config(tmp_path, data_cache))
    assert second.resumed_from.endswith("step_0000002")
    assert first.losses + second.losses == observed_run.summary.losses
    fields = TRAINING_FIELDS + VALIDATION_FIELDS
    expected = picked(rows(observed_run.run_dir), fields)
    assert [row["step"] for row in expected if "val_loss" in row] == [2, 4]
    assert picked(rows(tmp_path), fields) == expected


def validation_sequences(cfg) -> Sequences:
    """The first eval.iters global batches of the run's validation split, read with the data loader directly."""
    data = build_data_iterators(
        cfg.data,
        run_dir=cfg.run.dir,
        seq_length=cfg.train.seq_length,
        seed=cfg.run.seed,
        train_samples=cfg.train.steps * cfg.train.global_batch_size,
        consumed_samples=0,
        rank=DataRank(0, 1, cfg.train.micro_batch_size),
    )
    batches = iter(data.valid)
    taken = [next(batches) for _ in range(cfg.eval.iters * cfg.train.global_batch_size // cfg.train.micro_batch_size)]
    return Sequences(*(torch.cat([batch[key] for batch in taken]).numpy() for key in ("tokens", "labels", "loss_mask")))


@pytest.mark.system
def test_val_loss_equals_mimo_eval_of_that_steps_checkpoint(observed_run, data_cache):
    run_dir = observed_run.run_dir
    cfg = observed_config(run_dir, data_cache)
    sequences = validation_sequences(cfg)
    assert len(sequences.tokens) == cfg.eval.iters * cfg.train.global_batch_size
    result = evaluate(run_dir / "checkpoints" / "step_0000004", sequences, [f"data.cache_dir={data_cache}"])
    logged = next(row for row in rows(run_dir) if row["step"] == 4)
    assert result.step == 4 and result.tokens == sequences.loss_mask.sum()
    assert logged["val_loss"] == pytest.approx(result.loss, rel=1e-6)
    assert logged["val_ppl"] == pytest.approx(result.perplexity, rel=1e-6)
    assert logged["val_mtp_loss"] == pytest.approx(result.mtp_loss, rel=1e-6)
    assert logged["val_mtp_acceptance"] == pytest.approx(result.mtp_acceptance, abs=0.5 / result.mtp_tokens)
    before = next(row for row in rows(run_dir) if row["step"] == 2)
    assert before["val_loss"] != logged["val_loss"], "the two validations should see different weights"


def test_preserved_rng_puts_every_generator_back():
    def draw() -> tuple:
        return torch.rand(3).tolist(), random.random(), np.random.rand()

    with preserved_rng():
        state = draw()
    with preserved_rng():
        draw()
    assert draw() == state


def test_validation_needing_more_samples_than_built_is_refused():
    with pytest.raises(ConfigError, match=r"need 40 validation samples but data.valid_samples=32"):
        check_validation(load_config(["eval.iters=5", "data.valid_samples=32"]))
    check_validation(load_config(["eval.iters=5", "data.valid_samples=32", "eval.interval=0"]))
    with pytest.raises(ConfigError, match=r"eval.iters >= 1"):
        check_validation(load_config(["eval.iters=0"]))
