"""Emulated FP8 end to end: real ``mimo-train`` runs of the tiny model with ``precision.fp8=blockwise``.

It learns like BF16 without being BF16, logs its precision plan, and its tensor- and expert-parallel runs agree
with one rank (expert parallelism as closely as in BF16; tensor parallelism within what its own quantisation
blocks change). The 250-step main-job comparison is ``bench/bench_fp8.py``.
"""

import statistics

import pytest

from layout_runs import Run, run_group, run_single

STEPS = 8
COMPARED_STEPS = 3
"""The 2-rank runs stop after this many steps of the same schedule (train.stop_after_steps)."""
END_STEPS = 3
"""The end LM loss: mean of the last steps."""
END_GAP = 0.02
"""The emulated FP8 run ends within 2% of the BF16 run's LM loss (the report trains FP8 at BF16 quality)."""
LAYOUT_LOSS_TOLERANCE = 1e-4
GRAD_NORM_TOLERANCE = {"tp2": 1e-2, "ep2": 1e-3}
"""Against one rank over the first three steps. Measured for these runs: losses within 3e-5 in both layouts (BF16:
1e-5); gradient norms within 3e-3 under TP2 (BF16: 3e-4) and 1e-4 under EP2 (BF16: 1e-4). Tensor parallelism
changes FP8's numbers, as it does with Transformer Engine: each rank quantises its own shard of a weight in
128x128 blocks and its shard of a row-parallel input or a gradient in 1x128 tiles, and those blocks group other
elements than one rank's do. Expert parallelism keeps every block; only BF16's summation order moves."""

BF16 = ("precision.dtype=bf16",)
FP8 = (*BF16, "precision.fp8=blockwise")


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_cache) -> dict[str, Run]:
    runs = {
        "bf16": Run(tmp_path_factory.mktemp("bf16"), [f"train.steps={STEPS}", *BF16]),
        "fp8": Run(tmp_path_factory.mktemp("fp8"), [f"train.steps={STEPS}", *FP8]),
    }
    return {name: run_single(run, data_cache) for name, run in runs.items()}


def lm_losses(run: Run) -> list[float]:
    return [record["lm_loss"] for record in run.metrics()]


@pytest.mark.system
def test_emulated_fp8_trains_like_bf16_without_being_bf16(single):
    bf16, fp8 = lm_losses(single["bf16"]), lm_losses(single["fp8"])
    assert len(fp8) == len(bf16) == STEPS
    assert fp8[-1] < fp8[0] - 0.5, "the FP8 run did not learn"
    gap = statistics.fmean(fp8[-END_STEPS:]) / statistics.fmean(bf16[-END_STEPS:]) - 1
    assert abs(gap) <= END_GAP, f"end LM loss {gap:+.2%} from BF16"
    assert fp8 != bf16, "emulated FP8 gave exactly the BF16 losses: nothing was rounded"


@pytest.mark.system
def test_the_start_up_log_shows_the_precision_plan(single):
    log = "\n".join(single["fp8"].log)
    assert "FP8 blockwise (Hopper) emulated" in log
    assert "FP8:  QKV projection, dense FFN, expert FFNs, MTP projection (eh_proj)" in log
    assert "BF16: attention output projection, embedding, output head (report)" in log
    assert "FP32: router" in log


@pytest.mark.system
def test_tensor_and_expert_parallel_fp8_runs_match_one_rank(tmp_path, data_cache, single):
    layouts = {
        name: Run(tmp_path / name, [f"train.steps={STEPS}", f"train.stop_after_steps={COMPARED_STEPS}", *FP8, layout])
        for name, layout in (("tp2", "parallel.tp=2"), ("ep2", "parallel.ep=2"))
    }
    run_group(2, list(layouts.values()), data_cache)
    reference = single["fp8"].metrics()[:COMPARED_STEPS]
    for name, run in layouts.items():
        records = run.metrics()
        assert [r["step"] for r in records] == [r["step"] for r in reference], name
        for got, want in zip(records, reference):
            assert got["loss"] == pytest.approx(want["loss"], rel=LAYOUT_LOSS_TOLERANCE), name
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=GRAD_NORM_TOLERANCE[name]), name
