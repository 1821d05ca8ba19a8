"""Loss spikes: the detector against a plainly computed median, and every policy (log, skip, rollback, stop) on a
real run whose step 12 trains on a corrupted batch (``spike@12`` of the ``MIMO_FAULT_INJECTION`` testing hook: every
label becomes the last vocabulary id, which lifts the loss about 25% above the recent median at that point).
"""

import json
import shutil
import statistics

import pytest
import torch

from mimo.train.cli import main
from mimo.train.config import FaultConfig
from mimo.train.fault.injection import ENV_VAR
from mimo.train.fault.monitor import Action, FaultMonitor
from mimo.train.fault.spikes import SpikeDetector
from mimo.train.step import StepResult

from layout_runs import Run, run_single

SPIKE_STEP = 12
GLOBAL_BATCH = 8  # layout_runs.COMMON
DETECTOR = ("fault.spike_window=4", "fault.spike_factor=1.1")
"""A short window so the detector is armed by the spike; the tiny model's loss falls steadily, so a tenth above
the median is only ever the injected batch."""
RESUME_TOLERANCE = 1e-6


def result(loss: float, bad_ranks: tuple[int, ...] = ()) -> StepResult:
    return StepResult(loss, 0.0, 0.0, loss, float("nan"), True, 0, bad_ranks)


def test_detector_flags_losses_above_factor_times_the_median_once_the_window_is_full():
    losses = [5.0, 4.0, 6.0, 4.5, 3.0]
    detector = SpikeDetector(window=4, factor=1.5)
    for step, loss in enumerate(losses[:3], start=1):
        assert detector.check(step, 100.0) is None, "no verdict while the window fills"
        detector.accept(step, loss)
    detector.accept(4, losses[3])
    median = statistics.median(losses[:4])
    assert detector.check(5, 1.5 * median) is None
    spike = detector.check(5, 1.5 * median + 1e-9)
    assert spike is not None and spike.median == median and spike.limit == 1.5 * median
    detector.accept(5, losses[4])  # the window slides: 4.0, 6.0, 4.5, 3.0
    assert detector.limit() == 1.5 * statistics.median(losses[1:])
    restored = SpikeDetector(window=4, factor=1.5, history=detector.history())
    assert restored.limit() == detector.limit()


@pytest.mark.parametrize(
    "policy, action",
    [("log", Action.CONTINUE), ("skip", Action.CONTINUE), ("rollback", Action.ROLLBACK), ("stop", Action.STOP)],
)
def test_monitor_policies(policy, action):
    monitor = FaultMonitor(FaultConfig(spike_policy=policy, spike_window=2, max_consecutive_skips=2), is_main=False)
    for step in (1, 2):
        monitor.begin(step)
        assert monitor.approve(result(2.0))
    monitor.begin(3)
    assert monitor.approve(result(9.0)) is (policy == "log")
    assert monitor.decision.action is action
    monitor.begin(4)
    assert not monitor.approve(result(float("nan")))
    diverged = policy != "log"  # the spike was a skipped step too: two in a row
    assert (monitor.decision.action is Action.STOP) is diverged
    monitor.begin(5)
    assert not monitor.approve(result(2.0, bad_ranks=(3,)))
    assert monitor.decision.action is Action.STOP and "rank 3" in monitor.decision.reason


def spike_run(tmp_path, policy: str, *overrides: str) -> Run:
    return Run(tmp_path, ["train.steps=14", f"fault.spike_policy={policy}", *DETECTOR, *overrides])


@pytest.mark.system
@pytest.mark.parametrize("policy", ["log", "skip"])
def test_log_trains_on_the_spike_and_skip_does_not(tmp_path, data_cache, monkeypatch, policy):
    monkeypatch.setenv(ENV_VAR, f"spike@{SPIKE_STEP}")
    checkpoints = ("checkpoint.interval=11", f"train.stop_after_steps={SPIKE_STEP}")
    run = run_single(spike_run(tmp_path, policy, *checkpoints), data_cache)
    assert any("loss spike: loss" in line and f"at step {SPIKE_STEP}" in line for line in run.log)
    before, after = run.checkpoint(SPIKE_STEP - 1), run.checkpoint(SPIKE_STEP)
    unchanged = all(torch.equal(before[key], after[key]) for key in before)
    assert unchanged is (policy == "skip")
    assert run.metrics()[-1]["update_skipped"] is (policy == "skip")


@pytest.mark.system
def test_stop_saves_the_state_before_the_spike_and_exits_with_an_error(tmp_path, data_cache, monkeypatch, capfd):
    monkeypatch.setenv(ENV_VAR, f"spike@{SPIKE_STEP}")
    run = spike_run(tmp_path, "stop", "checkpoint.interval=11")
    assert main(run.argv(data_cache)) == 2
    error = capfd.readouterr().err
    assert "mimo-train: error: stopped on a loss spike (fault.spike_policy=stop)" in error
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{SPIKE_STEP:07d}"
    before, after = run.checkpoint(SPIKE_STEP - 1), run.checkpoint(SPIKE_STEP)
    assert all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.system
def test_rollback_reloads_the_checkpoint_before_the_spike_and_skips_its_data(tmp_path, data_cache, monkeypatch):
    """After the spike at step 12 the run returns to step 10 (checkpoints every 5 steps) and continues with the
    data after the spike's batch and one more. The reference is an independent resume of a copy of that
    checkpoint whose data position is moved there by hand."""
    monkeypatch.setenv(ENV_VAR, f"spike@{SPIKE_STEP}")
    skip = 1
    run = run_single(
        spike_run(tmp_path / "run", "rollback", "checkpoint.interval=5", f"fault.rollback_skip_batches={skip}"),
        data_cache,
    )
    steps = [record["step"] for record in run.metrics()]
    assert steps == [*range(1, SPIKE_STEP + 1), *range(11, 15)]
    assert any("rolled back to" in line and "step_0000010" in line for line in run.log)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_0000014"

    reference_dir = tmp_path / "reference" / "checkpoints"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step_0000010", reference_dir / "step_0000010")
    (reference_dir / "latest").write_text("step_0000010")
    meta_file = reference_dir / "step_0000010" / "mimo_checkpoint.json"
    meta = json.loads(meta_file.read_text())
    meta["consumed_samples"] = (SPIKE_STEP + skip) * GLOBAL_BATCH
    meta_file.write_text(json.dumps(meta))
    monkeypatch.delenv(ENV_VAR)
    reference = run_single(spike_run(tmp_path / "reference", "rollback", "checkpoint.interval=5"), data_cache)
    rolled_back = [record["loss"] for record in run.metrics()[-4:]]
    assert rolled_back == pytest.approx([record["loss"] for record in reference.metrics()], rel=RESUME_TOLERANCE)
