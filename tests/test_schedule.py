"""The token-keyed schedule against the closed-form values of the MiMo-V2-Flash report (section 3)."""

import math
import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mimo.model.config import ModelConfig
from mimo.train.config import OptimConfig, TrainConfig
from mimo.train.schedule import (
    LRSegment,
    Schedule,
    ScheduleConfig,
    ScheduleError,
    Stage,
    parse_tokens,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
B, T = 10**9, 10**12
PEAK, MIN = 3.2e-4, 1e-5


def flash_schedule(stage: str = "pretrain", *, batch: int = 2048, unit: int = 16) -> Schedule:
    """The shipped full-scale schedule, read from its recipe file into the typed config."""
    config = OmegaConf.merge(
        OmegaConf.structured(ScheduleConfig),
        OmegaConf.load(RECIPES / "schedule" / "mimo_v2_flash.yaml"),
        {"stage": stage},
    )
    return Schedule(
        OmegaConf.to_object(config),
        optim=OptimConfig(lr=PEAK, min_lr=MIN),
        train=TrainConfig(steps=1, global_batch_size=batch, micro_batch_size=1, seq_length=32768),
        model=ModelConfig(),
        batch_unit=unit,
    )


@pytest.mark.parametrize(
    "tokens, expected",
    [
        (0, 0.0),
        (25 * B, 1.6e-4),  # half-way through the warm-up
        (50 * B, PEAK),  # end of warm-up
        (6 * T, PEAK),  # constant phase
        (50 * B + 12 * T, PEAK),  # start of the stage-1 cosine
        (50 * B + 17 * T, (PEAK + 1e-4) / 2),  # mid-cosine: half-way between start and target
        (50 * B + 12 * T + 10 * T // 4, 1e-4 + (PEAK - 1e-4) * (1 + math.cos(math.pi / 4)) / 2),
        (22_050 * B, 1e-4),  # end of stage 1
        (24_050 * B, (1e-4 + 3e-5) / 2),  # middle of stage 2
        (26_050 * B, 3e-5),  # end of stage 2
        (26_550 * B, (3e-5 + MIN) / 2),  # middle of stage 3
        (27_050 * B, MIN),  # end of training
        (30 * T, MIN),  # past the last segment the LR holds
    ],
)
def test_lr_at_report_boundaries(tokens, expected):
    assert flash_schedule().at(tokens).lr == pytest.approx(expected, rel=1e-12, abs=1e-20)


@pytest.mark.parametrize(
    "tokens, batch, unit, expected",
    [
        (0, 2048, 16, 16),  # never below one unit
        (1 * B, 2048, 1, 4),  # 2048 * 1/500 = 4.096, rounded down
        (1 * B, 2048, 16, 16),  # 4.096 rounds down to zero units: one unit
        (125_100_000_000, 2048, 16, 512),  # 512.41 -> 512
        (250 * B, 2048, 16, 1024),  # half-way
        (250 * B, 2064, 48, 1008),  # 1032 / 48 = 21.5 units -> 21 units
        (500 * B - 1, 2048, 16, 2032),  # one token before the end of the ramp
        (500 * B, 2048, 16, 2048),
        (20 * T, 2048, 16, 2048),
    ],
)
def test_batch_rampup(tokens, batch, unit, expected):
    assert flash_schedule(batch=batch, unit=unit).at(tokens).global_batch_size == expected


def test_stage_three_batch_is_fixed():
    schedule = flash_schedule("long_context", batch=256, unit=8)
    assert schedule.at(26_050 * B).global_batch_size == 256


@pytest.mark.parametrize(
    "tokens, mtp, bias_rate",
    [
        (0, 0.3, 1e-3),
        (22_050 * B - 1, 0.3, 1e-3),
        (22_050 * B, 0.1, 1e-3),
        (26_050 * B - 1, 0.1, 1e-3),
        (26_050 * B, 0.1, 1e-5),
        (40 * T, 0.1, 1e-5),
    ],
)
def test_stage_values(tokens, mtp, bias_rate):
    values = flash_schedule().at(tokens)
    assert (values.mtp_loss_weight, values.moe_router_bias_update_rate, values.moe_aux_loss_coeff) == (
        mtp,
        bias_rate,
        1e-5,
    )


def test_stage_spans_and_finish():
    schedule = flash_schedule("midtrain")
    assert schedule.stages == {
        "pretrain": (0, 22_050 * B),
        "midtrain": (22_050 * B, 26_050 * B),
        "long_context": (26_050 * B, 27_050 * B),
    }
    assert schedule.stage_span == (22_050 * B, 26_050 * B)
    assert not schedule.finished(26_050 * B - 1)
    assert schedule.finished(26_050 * B)


def test_at_is_pure():
    """Values depend on the token count only: any call order, or a fresh object after a resume, agrees."""
    probes = [0, 1, 25 * B, 499 * B, 500 * B, 7 * T, 22_050 * B, 25 * T, 26_500 * B, 28 * T]
    reference = {tokens: flash_schedule().at(tokens) for tokens in probes}
    shuffled = probes * 3
    random.Random(0).shuffle(shuffled)
    reused = flash_schedule()
    for tokens in shuffled:
        assert reused.at(tokens) == reference[tokens]


def test_default_follows_optim_and_steps_overrides():
    optim = OptimConfig(lr=1e-3, min_lr=1e-4)
    for steps in (300, 600):
        train = TrainConfig(steps=steps, global_batch_size=16, micro_batch_size=4, seq_length=128)
        schedule = Schedule(ScheduleConfig(), optim=optim, train=train, model=ModelConfig())
        run_tokens = steps * 16 * 128
        assert schedule.at(run_tokens // 20).lr == pytest.approx(0.5e-3)  # half the 10% warm-up
        assert schedule.at(run_tokens // 10).lr == pytest.approx(1e-3)
        assert schedule.at(run_tokens // 10 + (run_tokens * 9 // 10) // 2).lr == pytest.approx(0.55e-3)
        assert schedule.at(run_tokens).lr == pytest.approx(1e-4)
        assert schedule.at(0).global_batch_size == 16
        assert schedule.finished(run_tokens) and not schedule.finished(run_tokens - 1)
        assert schedule.steps_between(0, run_tokens) == steps


def test_default_stage_values_come_from_model():
    model = ModelConfig(mtp_loss_weight=0.25, moe_router_bias_update_rate=2e-3, moe_aux_loss_coeff=1e-4)
    values = Schedule(ScheduleConfig(), optim=OptimConfig(), train=TrainConfig(), model=model).at(0)
    assert (values.mtp_loss_weight, values.moe_router_bias_update_rate, values.moe_aux_loss_coeff) == (
        0.25,
        2e-3,
        1e-4,
    )


def test_steps_between_walks_the_ramp():
    # Batch 4 sequences of 1 token, ramp over 8 tokens: batches 1,1,1,1,2,3 then 4,4 -> tokens
    # 0,1,2,3,4,6,9,13,17.
    config = ScheduleConfig(lr=[LRSegment("constant", 1)], batch_rampup_tokens=8, stages=[Stage(end=100)])
    train = TrainConfig(steps=1, global_batch_size=4, micro_batch_size=1, seq_length=1)
    schedule = Schedule(config, optim=OptimConfig(), train=train, model=ModelConfig())
    assert [schedule.batch_at(t) for t in (0, 1, 2, 3, 4, 6, 9)] == [1, 1, 1, 1, 2, 3, 4]
    assert schedule.steps_between(0, 17) == 8
    assert schedule.steps_between(0, 18) == 9
    assert schedule.steps_between(9, 17) == 2


def test_flash_stage_step_counts():
    """2048 x 32K = 2^26 tokens per step after the ramp (report: ~328K steps for stage 1 incl. the ramp)."""
    schedule = flash_schedule("midtrain")
    assert schedule.steps_between(22_050 * B, 26_050 * B) == math.ceil(4 * T / 2**26)


@pytest.mark.parametrize(
    "text, expected",
    [("50B", 50 * B), ("22.05T", 22_050 * B), ("1.5k", 1500), (5.0e10, 50 * B), (7, 7), ("10%", 100)],
)
def test_parse_tokens(text, expected):
    assert parse_tokens(text, run_tokens=1000, key="k") == expected


@pytest.mark.parametrize(
    "config, match",
    [
        (ScheduleConfig(lr=[LRSegment("warmup", "1B", "lr")]), "schedule.lr\\[0\\].kind"),
        (ScheduleConfig(lr=[LRSegment("constant", "1B", 1e-4)]), "remove its target"),
        (ScheduleConfig(lr=[LRSegment("cosine", "1B")]), "schedule.lr\\[0\\].target is missing"),
        (ScheduleConfig(lr=[LRSegment("cosine", "1B", "peak")]), "'lr' \\(optim.lr\\)"),
        (ScheduleConfig(lr=[LRSegment("linear", "fifty", "lr")]), "schedule.lr\\[0\\].tokens"),
        (ScheduleConfig(stages=[Stage("a", "1B"), Stage("b", "1B")]), "must be after"),
        (ScheduleConfig(stage="stage9"), "schedule.stage='stage9'"),
    ],
)
def test_errors_name_the_key(config, match):
    with pytest.raises(ScheduleError, match=match):
        Schedule(config, optim=OptimConfig(), train=TrainConfig(), model=ModelConfig())


def test_batch_must_be_whole_units():
    train = TrainConfig(global_batch_size=20, micro_batch_size=4)
    with pytest.raises(ScheduleError, match="train.global_batch_size=20"):
        Schedule(ScheduleConfig(), optim=OptimConfig(), train=train, model=ModelConfig(), batch_unit=8)


def test_stage_values_need_a_source():
    with pytest.raises(ScheduleError, match="mtp_loss_weight is unset"):
        Schedule(ScheduleConfig(), optim=OptimConfig(), train=TrainConfig())
