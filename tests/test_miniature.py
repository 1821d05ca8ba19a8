"""The CPU miniature (recipes/miniature.yaml): the three MiMo-V2-Flash stages in order on one run directory.

Shrunk for CI by dividing every token amount of the miniature schedule by SCALE (warm-up, constant and cosine
segments, batch ramp, stage ends), which keeps the schedule's shape and every stage's closed form: stage 1 takes
17 steps (3 of them in the batch ramp), stage 2 two, stage 3 one. Stages 1 and 2 train in this process (one
rank); stage 3 runs under torchrun with 2 processes, context parallelism 2 (each rank holds half of every
512-token sequence, as the real stage 3 splits 256K tokens over 8 ranks) and expert parallelism 2, so the
transition changes the sequence length (64 -> 512), the batch (16 -> 2 sequences), the RoPE base, the data
mixture and the layout, and the trainer reshards the checkpoint.

The values every step used (logged in metrics.jsonl), the first step of each stage included, are checked against
the schedule worked out by hand from recipes/schedule/miniature.yaml, not against mimo's Schedule class.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mimo.recipes import load_config
from mimo.train.trainer import run_training

from layout_runs import captured_log

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[1]
SCALE = 16
RECIPE_SCHEDULE = OmegaConf.load(REPO / "recipes" / "schedule" / "miniature.yaml")
PEAK_LR, MIN_LR = 3.2e-3, 1.0e-4  # optim.lr, optim.min_lr of recipes/miniature.yaml
STAGE1_TARGET, STAGE2_TARGET = 1.0e-3, 3.0e-4  # the cosine targets of the stage-1 and stage-2 segments
WARMUP, CONSTANT, COSINE1, COSINE2, COSINE3 = (segment.tokens // SCALE for segment in RECIPE_SCHEDULE.lr)
END1, END2, END3 = (stage.end // SCALE for stage in RECIPE_SCHEDULE.stages)
RAMP = RECIPE_SCHEDULE.batch_rampup_tokens // SCALE
SEQ12, BATCH12, MICRO12, UNIT1 = 64, 16, 4, 4  # stages 1-2: one rank, so the batch unit is the micro batch
SEQ3, BATCH3 = 512, 2


def scaled_schedule() -> list[str]:
    amounts = [segment.tokens for segment in RECIPE_SCHEDULE.lr] + [stage.end for stage in RECIPE_SCHEDULE.stages]
    assert all(amount % SCALE == 0 for amount in amounts + [RECIPE_SCHEDULE.batch_rampup_tokens])
    return [
        *(f"schedule.lr.{i}.tokens={segment.tokens // SCALE}" for i, segment in enumerate(RECIPE_SCHEDULE.lr)),
        *(f"schedule.stages.{i}.end={stage.end // SCALE}" for i, stage in enumerate(RECIPE_SCHEDULE.stages)),
        f"schedule.batch_rampup_tokens={RAMP}",
    ]


def half_cosine(start: float, end: float, progress: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


def expected_lr(tokens: int) -> float:
    """The miniature LR curve, scaled: warm-up, constant, then one cosine per stage."""
    cosine1_start = WARMUP + CONSTANT
    if tokens < WARMUP:
        return PEAK_LR * tokens / WARMUP
    if tokens < cosine1_start:
        return PEAK_LR
    if tokens < END1:
        return half_cosine(PEAK_LR, STAGE1_TARGET, (tokens - cosine1_start) / COSINE1)
    if tokens < END2:
        return half_cosine(STAGE1_TARGET, STAGE2_TARGET, (tokens - END1) / COSINE2)
    return half_cosine(STAGE2_TARGET, MIN_LR, (tokens - END2) / COSINE3)


def expected_batch(tokens: int) -> int:
    """Stages 1-2: the global batch grows linearly over the ramp, rounded down to whole units, at least one."""
    if tokens >= RAMP:
        return BATCH12
    return max(1, BATCH12 * tokens // (RAMP * UNIT1)) * UNIT1


def stage_records(run_dir: Path, first_step: int, seq: int) -> list[dict]:
    """The metrics of the steps from ``first_step`` on, each with the tokens consumed before it."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)), "steps do not continue"
    for record in records:
        record["tokens_before"] = record["tokens"] - record["global_batch_size"] * seq
    return records[first_step - 1 :]


@pytest.fixture
def mimo_log():
    with captured_log() as lines:
        yield lines


def step_values(record: dict) -> tuple:
    return (
        record["global_batch_size"],
        record["mtp_loss_weight"],
        record["moe_router_bias_update_rate"],
        record["moe_aux_loss_coeff"],
    )


def test_three_stages_in_order_on_one_run_directory(tmp_path, data_cache, mimo_log):
    run_dir = tmp_path / "miniature"
    common = [
        f"run.dir={run_dir}",
        f"data.cache_dir={data_cache}",
        "logging.interval=1",
        "checkpoint.interval=100000",
        *scaled_schedule(),
    ]
    checkpoint = run_dir / "checkpoints"

    # Stage 1: from scratch, through the warm-up and the batch ramp, to the stage-1 end
    first = run_training(load_config([*common, "miniature_stage=stage1"], config_name="miniature"))
    assert first.resumed_from is None and first.state.stage == "pretrain"
    records = stage_records(run_dir, 1, SEQ12)
    assert records[0]["lr"] == 0.0 and step_values(records[0]) == (UNIT1, 0.3, 1e-3, 1e-5)
    for record in records:
        assert record["lr"] == pytest.approx(expected_lr(record["tokens_before"]), rel=1e-12)
        assert record["global_batch_size"] == expected_batch(record["tokens_before"])
    end1_step, end1_tokens = records[-1]["step"], records[-1]["tokens"]
    assert END1 <= end1_tokens < END1 + BATCH12 * SEQ12, "stage 1 stops at the first step past its end"
    saved = f"saved checkpoint at step {end1_step} to {checkpoint} (end of stage 'pretrain', kept)"
    assert saved in mimo_log

    # Stage 2: resumes from stage 1's final checkpoint; the MTP weight drops, the LR follows the stage-2 cosine
    second = run_training(load_config([*common, "miniature_stage=stage2"], config_name="miniature"))
    assert second.resumed_from == str(checkpoint / f"step_{end1_step:07d}")
    assert "stage 'pretrain' -> 'midtrain': same settings" in mimo_log
    records = stage_records(run_dir, end1_step + 1, SEQ12)
    assert records[0]["tokens_before"] == end1_tokens
    assert step_values(records[0]) == (BATCH12, 0.1, 1e-3, 1e-5)
    for record in records:
        assert record["lr"] == pytest.approx(expected_lr(record["tokens_before"]), rel=1e-12)
    end2_step, end2_tokens = records[-1]["step"], records[-1]["tokens"]
    assert END2 <= end2_tokens < END2 + BATCH12 * SEQ12

    # Stage 3: 2 processes with context and expert parallelism 2, 8x the context, 1/8 the batch; resumes and
    # reshards
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "mimo.train",
        "--config-name",
        "miniature",
        *common,
        "miniature_stage=stage3",
        "parallel.cp=2",
        "parallel.ep=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    job = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output
    assert f"resumed from {checkpoint / f'step_{end2_step:07d}'} (step {end2_step}," in output, output
    assert "layout changed: world_size: 1 -> 2, ep: 1 -> 2, cp: 1 -> 2, micro_batch_size: 4 -> 1" in output
    assert (
        "stage 'midtrain' -> 'long_context': train.seq_length 64 -> 512; train.global_batch_size 16 -> 2;"
        " model.rope_theta 640000.0 -> 5000000.0; data.long_docs" in output
    ), output
    assert "the data changed (mixture or sequence length): a new sample stream starts" in output
    records = stage_records(run_dir, end2_step + 1, SEQ3)
    assert records[0]["tokens_before"] == end2_tokens
    assert step_values(records[0]) == (BATCH3, 0.1, 1e-5, 1e-5)
    for record in records:
        assert record["lr"] == pytest.approx(expected_lr(record["tokens_before"]), rel=1e-12)
    end3_step = records[-1]["step"]
    assert END3 <= records[-1]["tokens"] < END3 + BATCH3 * SEQ3
    assert f"saved checkpoint at step {end3_step} to {checkpoint} (end of stage 'long_context', kept)" in output

    # Every stage's final checkpoint is kept; the run ends at the schedule's end
    assert all((checkpoint / f"step_{step:07d}").is_dir() for step in (end1_step, end2_step, end3_step))
    assert (checkpoint / "latest").read_text() == f"step_{end3_step:07d}"
