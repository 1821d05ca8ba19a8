"""TFLOP/s per device and MFU: the model's FLOPs per token from model/accounting, the peak from the planner's table
(or a measured matmul without an entry)."""

import json

import pytest
import torch

from mimo.model.accounting import flops_per_token
from mimo.model.config import ModelConfig
from mimo.train.throughput import Peak, Throughput, measured_peak, table_peak
from mimo.train.tools.plan.settings import GPUS

from observed import observed_config


@pytest.mark.parametrize(
    "device_name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H200", 989.4),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA GB200", 2500.0),
        ("NVIDIA H100 PCIe", None),  # another H100 with a lower peak: measured, not taken from the SXM entry
    ],
)
def test_the_peak_comes_from_the_planners_table_by_device_name(device_name, tflops):
    peak = table_peak(device_name)
    assert (peak.tflops if peak else None) == tflops
    assert len({spec.device_name for spec in GPUS.values()}) == len(GPUS)


def test_mfu_is_model_flops_per_device_over_the_peak():
    model = ModelConfig()
    throughput = Throughput(model, seq_length=128, world_size=4, peak=Peak(2.0, "test"))
    values = throughput.of(tokens_per_s=1000.0)
    by_hand = 1000.0 * flops_per_token(model, 128).training / 4 / 1e12
    assert values["tflops_per_device"] == pytest.approx(by_hand, rel=1e-12)
    assert values["mfu"] == pytest.approx(by_hand / 2.0, rel=1e-12)


def test_the_measured_cpu_peak_is_positive_and_moves_no_random_stream():
    state = torch.get_rng_state()
    peak = measured_peak(torch.device("cpu"), torch.float32)
    assert torch.equal(torch.get_rng_state(), state)
    assert 0 < peak.tflops < 100 and "measured" in peak.source


@pytest.mark.system
def test_a_runs_logged_flops_are_accountings(observed_run, data_cache):
    cfg = observed_config(observed_run.run_dir, data_cache)
    expected = flops_per_token(cfg.model, cfg.train.seq_length).training
    rows = [json.loads(line) for line in (observed_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["tflops_per_device"] * 1e12 / row["tokens_per_s"] == pytest.approx(expected, rel=1e-9)
        assert row["mfu"] > 0
    peaks = {row["tflops_per_device"] / row["mfu"] for row in rows}
    assert max(peaks) == pytest.approx(min(peaks), rel=1e-9), "one peak for the whole run"
