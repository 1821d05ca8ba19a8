"""Real training runs under context parallelism: the halo exchange (the default for sliding-window layers) and the
all-gather train the tiny MiMo exactly as one rank does, and as each other.

The window is 24 tokens (sinks on, as in every SWA layer) and the loss is masked after every end-of-document token:
under CP4 (chunks of 16) a window spans two chunks, one of them on another rank (CP2, windows inside the chunk
before, runs with the halo in tests/test_layouts.py; two runs more here would cost a minute of the suite). Compared
as in tests/test_layouts.py: every logged metric of both steps and every tensor of the step-2 checkpoint, within
1e-5 relative.
"""

import pytest

from layout_runs import Run, run_group, run_single, tensor_differences, worst_metric_difference

TOLERANCE = 1e-5
CP = 4
SETTINGS = ("model.sliding_window=24", "data.eod_mask_loss=true", "train.steps=2", "checkpoint.interval=2")
EXCHANGES = ("halo", "allgather")


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_cache) -> Run:
    return run_single(Run(tmp_path_factory.mktemp("single"), SETTINGS), data_cache)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache) -> dict[tuple[int, str], Run]:
    runs = {
        (CP, exchange): Run(
            tmp_path_factory.mktemp(f"cp{CP}-{exchange}"),
            [f"parallel.cp={CP}", f"parallel.cp_window_exchange={exchange}", *SETTINGS],
        )
        for exchange in EXCHANGES
    }
    run_group(CP, list(runs.values()), data_cache)
    return runs


@pytest.mark.system
@pytest.mark.parametrize("cp", [CP])
@pytest.mark.parametrize("exchange", EXCHANGES)
def test_context_parallel_run_matches_one_rank(cp, exchange, runs, single):
    run = runs[cp, exchange]
    worst = worst_metric_difference(single.metrics(), run.metrics())
    assert max(worst.values()) <= TOLERANCE, worst
    trained = tensor_differences(single.checkpoint(2), run.checkpoint(2))
    assert max(trained.values()) <= TOLERANCE, sorted(trained.items(), key=lambda item: -item[1])[:5]


@pytest.mark.system
@pytest.mark.parametrize("cp", [CP])
def test_halo_matches_the_all_gather(cp, runs):
    halo, gathered = runs[cp, "halo"], runs[cp, "allgather"]
    worst = worst_metric_difference(gathered.metrics(), halo.metrics())
    assert max(worst.values()) <= TOLERANCE, worst
    trained = tensor_differences(gathered.checkpoint(2), halo.checkpoint(2))
    assert max(trained.values()) <= TOLERANCE, sorted(trained.items(), key=lambda item: -item[1])[:5]
