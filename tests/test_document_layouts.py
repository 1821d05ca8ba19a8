"""Real training runs with document masking (data.reset_attention_mask, positions restarting, EOD-masked loss):
one rank, and context parallelism 2 with the halo exchange and with the all-gather, train the tiny MiMo alike.

The shipped corpus packs documents of 20-120 tokens into 128-token samples, so under CP2 (chunks of 32) documents
cross chunk and rank boundaries and the window of 24 reaches into the chunk before. One rank's masking is checked
against each document run alone in tests/test_document_model.py; here every logged metric of both steps and every
tensor of the step-2 checkpoint must agree within 1e-5 relative, and differ from training without the masking.
"""

import pytest

from layout_runs import Run, run_group, run_single, tensor_differences, worst_metric_difference

TOLERANCE = 1e-5
COMMON = ("model.sliding_window=24", "data.eod_mask_loss=true", "train.steps=2", "checkpoint.interval=2")
MASKED = (*COMMON, "data.reset_attention_mask=true", "data.reset_position_ids=true")
EXCHANGES = ("halo", "allgather")


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_cache) -> Run:
    return run_single(Run(tmp_path_factory.mktemp("masked"), MASKED), data_cache)


@pytest.fixture(scope="module")
def context_parallel(tmp_path_factory, data_cache) -> dict[str, Run]:
    runs = {
        exchange: Run(
            tmp_path_factory.mktemp(f"masked-cp2-{exchange}"),
            ["parallel.cp=2", f"parallel.cp_window_exchange={exchange}", *MASKED],
        )
        for exchange in EXCHANGES
    }
    run_group(2, list(runs.values()), data_cache)
    return runs


@pytest.mark.system
@pytest.mark.parametrize("exchange", EXCHANGES)
def test_context_parallel_document_masking_matches_one_rank(exchange, context_parallel, single):
    run = context_parallel[exchange]
    worst = worst_metric_difference(single.metrics(), run.metrics())
    assert max(worst.values()) <= TOLERANCE, worst
    trained = tensor_differences(single.checkpoint(2), run.checkpoint(2))
    assert max(trained.values()) <= TOLERANCE, sorted(trained.items(), key=lambda item: -item[1])[:5]


@pytest.mark.system
def test_document_masking_changes_training(tmp_path_factory, data_cache, single):
    """Positions restart in both runs: only the attention masking differs."""
    unmasked = run_single(
        Run(tmp_path_factory.mktemp("unmasked"), (*COMMON, "data.reset_position_ids=true")), data_cache
    )
    assert abs(unmasked.metrics()[0]["lm_loss"] - single.metrics()[0]["lm_loss"]) > 1e-4
