"""mimo-report draws its figures for a finished run, a running one, two side by side, and an older mimo's run.

The multi-stage runs here are written by the test: the miniature recipe's config.yaml (three schedule stages) and
metrics rows whose schedule values come from that recipe's schedule, with a data mixture that changes at a stage
boundary. A real mimo-train run's directory is read by the system test at the end (the ``observed_run`` fixture).
"""

import json
import math
import struct
from pathlib import Path

import pytest

from mimo.recipes.compose import load_config, to_yaml
from mimo.train.schedule import Schedule
from mimo.train.tools.report.cli import main
from mimo.train.tools.report.runs import read_rows

FIGURES = ("loss.png", "schedule.png", "throughput.png", "expert_load.png", "data_mixture.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPERTS, MOE_LAYERS, TOP_K = 8, 3, 2


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (IHDR follows the signature)."""
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def miniature_run(directory: Path, *, every: int = 5, offset: float = 0.0) -> Path:
    """A run directory shaped like the three miniature stages trained one after another into it."""
    directory.mkdir(parents=True)
    cfg = load_config(["miniature_stage=stage3", f"run.dir={directory}"], config_name="miniature")
    (directory / "config.yaml").write_text(to_yaml(cfg))
    schedule = Schedule(cfg.schedule, optim=cfg.optim, train=cfg.train, model=cfg.model)
    end = max(stop for _, stop in schedule.stages.values())
    rows, tokens, step, seq = [], 0, 0, 64
    while tokens < end:
        values = schedule.at(tokens)
        step, tokens = step + 1, tokens + values.global_batch_size * seq
        if step % every and tokens < end:
            continue
        midtrain = tokens > schedule.stages["pretrain"][1]
        loss = 8.0 * math.exp(-tokens / 1e5) + 2.0 + offset
        load = [[(1 + (e + layer) % 3) * tokens for e in range(EXPERTS)] for layer in range(MOE_LAYERS)]
        rows.append(
            {
                "step": step,
                "tokens": tokens,
                "lm_loss": loss,
                "mtp_loss": loss + 0.1,
                "lr": values.lr,
                "global_batch_size": values.global_batch_size,
                "mtp_loss_weight": values.mtp_loss_weight,
                "moe_router_bias_update_rate": values.moe_router_bias_update_rate,
                "tokens_per_s": 3000.0 + 100 * offset,
                "tflops_per_device": 0.04,
                "mfu": 0.15,
                "peak_memory_gib": 0.8,
                "samples_per_dataset": {"web": 12, "code": 4} if midtrain else {"web": 16, "code": 0},
                "moe_tokens_per_expert": load,
                "moe_max_violation": 0.5,
                **(
                    {"val_loss": loss - 0.05, "val_mtp_loss": loss, "val_ppl": math.exp(loss)} if step % 20 == 0 else {}
                ),
            }
        )
    (directory / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory


def report(tmp_path: Path, *runs: Path) -> tuple[Path, str]:
    out = tmp_path / "report"
    assert main([*map(str, runs), "--out", str(out)]) == 0
    return out, (out / "summary.md").read_text()


def test_a_finished_multi_stage_run_gets_every_figure(tmp_path):
    out, summary = report(tmp_path, miniature_run(tmp_path / "mini"))
    for name in FIGURES:
        width, height = png_size(out / name)
        assert width > 400 and height > 300, name
        assert f"]({name})" in summary, f"{name} is not linked from summary.md"
    row = next(line for line in summary.splitlines() if line.startswith("| mini |"))
    assert "| finished |" in row and "| 15.0% |" in row


def test_a_running_run_is_read_as_far_as_it_got(tmp_path):
    run = miniature_run(tmp_path / "running")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:20]) + "\n" + lines[20][:40])  # cut mid-write
    assert [row["step"] for row in read_rows(run / "metrics.jsonl")] == [json.loads(x)["step"] for x in lines[:20]]
    out, summary = report(tmp_path, run)
    assert all((out / name).exists() for name in FIGURES)
    assert f"running or stopped (last logged step {json.loads(lines[19])['step']})" in summary


def test_two_runs_are_drawn_side_by_side(tmp_path):
    single = report(tmp_path / "one", miniature_run(tmp_path / "a"))[0]
    out, summary = report(tmp_path / "two", tmp_path / "a", miniature_run(tmp_path / "b", offset=0.5))
    assert [
        line.split("|")[1].strip()
        for line in summary.splitlines()
        if line.startswith("| a |") or line.startswith("| b |")
    ] == ["a", "b"]
    # One expert-load heatmap and one mixture panel per run: the figures widen.
    assert png_size(out / "expert_load.png")[0] > png_size(single / "expert_load.png")[0]
    assert png_size(out / "data_mixture.png")[0] > png_size(single / "data_mixture.png")[0]


def test_an_older_run_skips_what_it_did_not_log(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    rows = [
        {"step": s, "tokens": 1024 * s, "loss": 5.0, "lm_loss": 4.0, "lr": 1e-3, "tokens_per_s": 2500.0}
        for s in (1, 10, 20)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run / "config.yaml").write_text("run:\n  dir: old\nremoved_group:\n  key: 1\n")
    out, summary = report(tmp_path, run)
    assert (out / "loss.png").exists() and (out / "schedule.png").exists() and (out / "throughput.png").exists()
    assert not (out / "expert_load.png").exists() and not (out / "data_mixture.png").exists()
    assert "expert load: not drawn, no run logged moe_tokens_per_expert" in summary
    assert "old: no validation logged" in summary
    assert "stage boundaries are not marked" in summary


def test_a_directory_without_metrics_is_refused(tmp_path, capsys):
    assert main([str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


@pytest.mark.system
def test_a_real_run_gets_its_figures(tmp_path, observed_run):
    out, summary = report(tmp_path, observed_run.run_dir)
    for name in FIGURES[:4]:
        assert png_size(out / name)[0] > 400, name
    assert "data mixture: not drawn, every run reads one dataset" in summary
    assert "| finished |" in summary
