"""The numerical guard: a step with a non-finite loss or gradient changes nothing, on one rank and on two, and a
run that blows up stops with a finite checkpoint that evaluates to a finite loss.

Faults are injected into real runs through the testing hook ``MIMO_FAULT_INJECTION`` (mimo.train.fault.injection):
a NaN loss mask in a batch, a NaN in one rank's reduced gradients. The reference for "changes nothing" is the
checkpoint saved just before the faulty step, compared tensor by tensor, bit for bit.
"""

import math
from pathlib import Path

import pytest
import torch

from mimo.train.checkpoint.health import all_finite
from mimo.train.cli import main
from mimo.train.fault.injection import ENV_VAR
from mimo.train.tools.evaluate import evaluate

from layout_runs import Run, checkpoint_tensors, run_group, run_single

EVAL_TEXT = (
    "The Jargon File is a comprehensive compendium of hacker slang illuminating many aspects of hackish tradition,"
    " folklore, and humor. A hacker is a person who enjoys exploring the details of programmable systems. "
) * 8


def test_all_finite_finds_nan_and_infinity_and_tolerates_sums_that_overflow():
    finite = [torch.ones(1000), torch.full((10,), 3e38), torch.ones(5, dtype=torch.bfloat16), torch.arange(4)]
    assert all_finite(finite), "3e38 x 10 overflows its sum, yet every value is finite"
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = torch.ones(1000)
        poisoned[777] = bad
        assert not all_finite([*finite, poisoned])
    assert not all_finite([torch.tensor([float("nan")], dtype=torch.bfloat16)])


def assert_bit_identical(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert changed == [], f"a skipped step changed {changed}"


def saved_state_kinds(tensors: dict[str, torch.Tensor]) -> set[str]:
    """Which kinds of state a checkpoint's tensors hold (optimizer entries are named
    ``chained_N.optimizer.state.<kind>.<parameter>``), so that a comparison of two is known to cover them."""
    kinds = {key.split(".")[3] for key in tensors if key.startswith("chained_")}
    return kinds | ({"expert_bias"} if any(key.endswith(".expert_bias") for key in tensors) else set())


def adam_steps(checkpoint: Path) -> list[float]:
    """The Adam step count of every parameter group: megatron keeps them with the param groups in common.pt."""
    common = torch.load(checkpoint / "common.pt", weights_only=False)["optimizer"]
    return [group["step"] for part in common.values() for group in part["optimizer"]["param_groups"]]


@pytest.mark.system
def test_non_finite_loss_and_gradients_change_nothing(tmp_path, data_cache, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "nan_loss@3,nan_grad@4")
    run = run_single(Run(tmp_path, ["train.steps=5", "checkpoint.interval=1", "checkpoint.keep=10"]), data_cache)

    step2, step3, step4, step5 = (run.checkpoint(step) for step in (2, 3, 4, 5))
    assert saved_state_kinds(step2) == {"param", "exp_avg", "exp_avg_sq", "expert_bias"}
    assert_bit_identical(step2, step3)
    assert_bit_identical(step2, step4)
    moved = {key for key in step2 if not torch.equal(step2[key], step5[key])}
    assert {"param", "exp_avg", "exp_avg_sq", "expert_bias"} <= saved_state_kinds({key: None for key in moved})
    steps = {step: set(adam_steps(tmp_path / "checkpoints" / f"step_{step:07d}")) for step in (2, 3, 4, 5)}
    assert steps == {2: {2.0}, 3: {2.0}, 4: {2.0}, 5: {3.0}}

    records = {record["step"]: record for record in run.metrics()}
    assert [records[step]["update_skipped"] for step in range(1, 6)] == [False, False, True, True, False]
    assert records[5]["skipped_steps"] == 2
    assert records[4]["tokens"] == records[2]["tokens"] < records[5]["tokens"], "skipped steps train no tokens"
    assert records[5]["samples"] == 5 * 8, "skipped steps consume their batch"
    warnings = [line for line in run.log if "update skipped" in line]
    assert "step 3: the loss and the gradients on rank 0 not finite" in warnings[0]
    assert "step 4: the gradients on rank 0 not finite" in warnings[1]


@pytest.mark.system
def test_two_ranks_agree_on_one_ranks_bad_gradient(tmp_path, data_cache, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "nan_grad@2:1")
    (run,) = run_group(2, [Run(tmp_path, ["train.steps=3", "checkpoint.interval=1", "checkpoint.keep=10"])], data_cache)
    assert_bit_identical(run.checkpoint(1), run.checkpoint(2))
    assert any("step 2: the gradients on rank 1 not finite" in line for line in run.log)
    assert [record["update_skipped"] for record in run.metrics()] == [False, True, False]


@pytest.mark.system
def test_a_blow_up_stops_with_a_finite_checkpoint_that_evaluates(tmp_path, data_cache, capfd):
    """The issue's case: optim.lr=1e6 without clipping. The gradients overflow first; no update is applied from
    then on, the run stops after fault.max_consecutive_skips and its latest checkpoint evaluates finite."""
    run = Run(
        tmp_path,
        [
            "train.steps=40",
            "optim.lr=1e6",
            "optim.clip_grad=0",
            "checkpoint.interval=100",
            "fault.max_consecutive_skips=3",
        ],
    )
    code = main(run.argv(data_cache))
    error = capfd.readouterr().err
    assert code == 2, "a diverged run exits with an error"
    assert "mimo-train: error: the run diverged: 3 steps in a row were skipped" in error
    assert "Traceback" not in error and "optim.clip_grad" in error
    records = run.metrics()
    first_skip = next(record["step"] for record in records if record["update_skipped"])
    assert records[-1]["step"] == first_skip + 2 < 40, "the run stops after 3 skipped steps, not at the end"
    assert not any(record["update_skipped"] for record in records if record["step"] < first_skip)

    latest = (tmp_path / "checkpoints" / "latest").read_text()
    assert latest == f"step_{first_skip + 2:07d}"
    tensors = checkpoint_tensors(tmp_path / "checkpoints" / latest)
    assert all(torch.isfinite(tensor).all() for tensor in tensors.values() if tensor.is_floating_point())
    text = tmp_path / "held_out.txt"
    text.write_text(EVAL_TEXT)
    result = evaluate(tmp_path, text)
    assert math.isfinite(result.loss) and result.step == first_skip + 2
