"""bench/gpu_check.sh --cpu: every stage of the first-GPU check runs at toy size and the summary says so."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGES = ("environment", "tiny", "proxy_bf16", "proxy_fp8", "attention", "proxy_bf16_long")
TIMEOUT_S = 600


@pytest.mark.system
def test_cpu_mode_runs_every_stage_and_writes_the_summary(tmp_path):
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--cpu", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["mode"] == "cpu"
    assert {stage: summary[stage]["status"] for stage in STAGES} == dict.fromkeys(STAGES, "ok")
    assert summary["proxy_te_fp8"]["status"].startswith("skipped")

    tiny = summary["tiny"]
    assert tiny["passed"] and len(tiny["device_lm_losses"]) == len(tiny["cpu_lm_losses"]) >= 1
    assert "CPU (--cpu: no device)" in tiny["compared"]

    bf16, fp8 = summary["proxy_bf16"], summary["proxy_fp8"]
    assert bf16["tokens_per_s"] > 0 and bf16["model_tflops_per_s"] > 0 and bf16["mfu"] is None
    assert len(fp8["lm_loss_gap_vs_bf16"]) == len(bf16["lm_losses"])
    assert any(gap != 0 for gap in fp8["lm_loss_gap_vs_bf16"]), "emulated FP8 matched BF16 exactly"
    assert summary["proxy_bf16_long"]["seq_length"] > bf16["seq_length"]
    for entry in (value for key, value in summary["attention"].items() if key.startswith("seq_")):
        assert isinstance(entry["swa_ms"], float) and isinstance(entry["ga_ms"], float)

    table = done.stdout
    assert "tiny             ok       worst LM-loss gap" in table and "PASS" in table
    assert "proxy_fp8        ok       seq" in table
