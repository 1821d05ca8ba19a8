"""mimo-plan's arithmetic for the 309B model against closed forms worked out by hand, and its verdicts."""

import json
from dataclasses import replace

import pytest

from mimo.model import accounting
from mimo.parallel.config import ParallelConfig
from mimo.parallel.layout import validate_layout
from mimo.recipes import load_config
from mimo.train.schedule import Schedule
from mimo.train.tools.plan.activations import Recompute, in_flight_micro_batches
from mimo.train.tools.plan.cli import main
from mimo.train.tools.plan.communication import communication
from mimo.train.tools.plan.memory import estimate_memory
from mimo.train.tools.plan.parameters import stage_params
from mimo.train.tools.plan.planning import FULL_RECOMPUTE, make_plan
from mimo.train.tools.plan.settings import GIB, GPUS, PlanError, resolve_layout

V, H = 152_576, 4096
SEQ, TP, PP, EP = 32768, 4, 16, 16
B = 2  # bf16 bytes
LOCAL = SEQ // TP  # tokens per rank in the sequence-parallel regions
ROTARY = 64  # int(192 * 0.334)
NO_FP8_NO_RECOMPUTE = ("precision.fp8=null", "model.recompute_granularity=null", "model.recompute_method=null")


@pytest.fixture(scope="module")
def stage1():
    """Stage 1 on 256 H100 (tp 4, pp 16, ep 16; dp 4, expert-dp 1), FP8 weight copies and recomputation left
    out."""
    cfg = load_config(["cluster=h100_256", *NO_FP8_NO_RECOMPUTE], config_name="mimo_v2_flash_stage1")
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep, cfg.train.micro_batch_size) == (TP, PP, EP, 1)
    return cfg


def test_parameter_count(stage1):
    assert accounting.parameter_counts(stage1.model).total == 309_108_042_240


@pytest.mark.parametrize("pp", [1, 4, 16])
def test_every_parameter_is_placed_once(stage1, pp):
    """Summed over pipeline stages (splits undone), the placement holds the model once, plus the embedding copy
    the last stage keeps for the MTP block when the pipeline has several stages."""
    cfg = replace(stage1, parallel=replace(stage1.parallel, pp=pp))
    layout = resolve_layout(cfg, 256 if pp > 1 else 64)
    placed = sum(
        p.tensor_parallel + p.replicated + p.experts for p in (stage_params(cfg.model, layout, r) for r in range(pp))
    )
    assert placed == accounting.parameter_counts(cfg.model).total + (V * H if pp > 1 else 0)


# Closed forms for pipeline stage 1 = decoder layers 3, 4, 5 (SWA, SWA, GA; all MoE) --------------------------
SWA_ATTN = 64 * 192 * H + 8 * 192 * H + 8 * 128 * H + 64 * 128 * H + 64  # q, k, v, o, sinks
GA_ATTN = 64 * 192 * H + 4 * 192 * H + 4 * 128 * H + 64 * 128 * H
EXPERTS = 256 * 3 * H * 2048
LAYER_REPLICATED = 2 * H + 256 * H  # two norms and the router
STAGE1_DENSE = (2 * SWA_ATTN + GA_ATTN) / TP + 3 * LAYER_REPLICATED
STAGE1_EXPERTS = 3 * EXPERTS / EP


NORM = LOCAL * H * B + LOCAL * 4 + LOCAL * H * B  # TE norm: input, fp32 1/rms; its output, kept by the linear


def _attention_saved(kv_heads: int) -> float:
    rope = 4 * SEQ * ROTARY * B  # cos and sin for queries and keys
    qkv = SEQ * (64 / TP * 192 + kv_heads / TP * (192 + 128))
    out = SEQ * 64 / TP * 128  # the output projection's input
    return NORM + rope + (qkv + out) * B + SEQ * 64 / TP * 4  # + flash attention's fp32 log-sum-exp


ROWS = LOCAL * 8  # token copies the experts of one rank process (balanced routing)
ROUTER = LOCAL * (256 * 2 * 4 + 8 * 2 * 8 + 8 * 4 + 2 * 4)  # fp32 logits/scores, int64 top-k (x2), probs, sums
PERMUTATION = LOCAL * 256 * (1 + 4) + LOCAL * 8 * 8  # routing map, scattered probs, int64 permutation
EXPERTS_SAVED = ROWS * (H + 2 * 2048 + 4 * 2048) * B + ROWS * 4  # fc1 in/out, 4 SwiGLU widths, row probabilities
MOE_SAVED = NORM + ROUTER + PERMUTATION + EXPERTS_SAVED
SWA_LAYER, GA_LAYER = _attention_saved(8) + MOE_SAVED, _attention_saved(4) + MOE_SAVED


def test_stage_memory_closed_form(stage1):
    stage = estimate_memory(stage1, world_size=256).stages[1]
    assert stage.layers == (3, 4, 5)
    assert stage.weights == round((STAGE1_DENSE + STAGE1_EXPERTS) * B)
    assert stage.gradients == round((STAGE1_DENSE + STAGE1_EXPERTS) * 4)
    # fp32 master + two Adam moments, dense states sharded over dp = 4, experts over expert-dp = 1
    assert stage.optimizer == round(12 * (STAGE1_DENSE / 4 + STAGE1_EXPERTS))
    assert stage.in_flight == PP - 1
    assert stage.activations == round((PP - 1) * (2 * SWA_LAYER + GA_LAYER))
    assert stage.moe_dispatch == 2 * LOCAL * 8 * H * B
    assert stage.logits == 0
    assert stage.reserved == 5 * GIB


def test_full_recomputation_keeps_layer_inputs(stage1):
    stage = estimate_memory(stage1, world_size=256, recompute=FULL_RECOMPUTE).stages[1]
    layer_input = LOCAL * H * B
    assert stage.activations == round((PP - 1) * 3 * layer_input + SWA_LAYER)  # + one layer rematerialised


def test_last_stage_logits(stage1):
    last = estimate_memory(stage1, world_size=256).stages[-1]
    vocab_slice = SEQ * V / TP
    # fp32 softmax kept by the LM head's and the MTP head's cross entropy, + the bf16 logits next to their fp32 copy
    assert last.logits == round(vocab_slice * (2 * 4 + 2))


def test_fp8_adds_weight_copies():
    fp8 = load_config(["cluster=h100_256"], config_name="mimo_v2_flash_stage1")
    with_copies = estimate_memory(fp8, world_size=256).stages[1].weights
    qkv = 64 * 192 * H * 3 + (2 * 8 + 4) * (192 + 128) * H
    assert with_copies - round((STAGE1_DENSE + STAGE1_EXPERTS) * B) == round(2 * (qkv / TP + STAGE1_EXPERTS))


def test_in_flight_micro_batches():
    model = load_config(["model=tiny", "model.num_layers=16"]).model

    def layout(vpp):
        parallel = ParallelConfig(pp=4, vpp=vpp)
        return validate_layout(parallel, model, 4, global_batch_size=8, micro_batch_size=1, seq_length=8)

    assert [in_flight_micro_batches(layout(None), r) for r in range(4)] == [4, 3, 2, 1]
    # interleaved 1F1B: warm-up (pp - r - 1) * 2 + (vpp - 1) * pp chunks, then one more
    assert [in_flight_micro_batches(layout(2), r) for r in range(4)] == [11, 9, 7, 5]


def test_throughput_and_days(stage1):
    plan = make_plan(stage1, world_size=256, gpu=GPUS["h100"], recipe="mimo_v2_flash_stage1")
    forward = accounting.flops_per_token(stage1.model, SEQ).forward
    tokens_per_s = 256 * 989.4e12 * 0.4 / (3 * forward)
    assert plan.tokens_per_s == pytest.approx(tokens_per_s)
    pretrain = plan.stages[0]
    assert (pretrain.name, pretrain.current, pretrain.end_tokens) == ("pretrain", True, 22_050 * 10**9)
    assert pretrain.days == pytest.approx(22.05e12 / tokens_per_s / 86400)
    long_context = plan.stages[2]
    assert long_context.seq_length == 262_144  # estimated from its own recipe
    assert long_context.tokens_per_s == pytest.approx(
        256 * 989.4e12 * 0.4 / accounting.flops_per_token(stage1.model, 262_144).training
    )


def test_expert_all_to_all_volume(stage1):
    layout = resolve_layout(stage1, 256)
    ep = {t.kind: t for t in communication(stage1, layout, GPUS["h100"])}["EP all-to-all"]
    per_layer = LOCAL * 8 * H * B * (EP - 1) / EP  # one dispatch (or combine) of a micro-batch
    assert ep.bytes == round(4 * 3 * 512 * per_layer)  # 4 passes, 3 MoE layers, 512 micro-batches
    assert ep.between_nodes == pytest.approx(8 / 15)  # 8 of 15 peers on the other node


@pytest.mark.parametrize("exchange", ["halo", "allgather"])
def test_context_parallel_exchange_volume(exchange):
    """Stage 3 on 256 GPUs (tp 4, pp 8 of 6 layers, cp 8 of chunks of 16K tokens, full recomputation, micro-batch
    1). Global layers bring in the keys and values of the 7 other ranks' 32K tokens in each of their 2 forwards
    and twice in the backward. Sliding-window layers (window 128) with the halo exchange: a middle rank sends the
    last 128 tokens of each of its two chunks in each forward and receives them both back as gradients in the
    backward (the two end ranks half that); with the all-gather they count as global layers. The busiest stage
    sends: the last (layers 42-47 and the SWA MTP block) with the all-gather, the first (layers 0-5, two of them
    global) with the halo."""
    cfg = load_config(
        ["cluster=h100_256", f"parallel.cp_window_exchange={exchange}"], config_name="mimo_v2_flash_stage3"
    )
    layout = resolve_layout(cfg, 256)
    cp = {t.kind: t for t in communication(cfg, layout, GPUS["h100"])}["CP attention exchange"]
    tokens, width, window = 262_144 // 8, 192 + 128, 128
    kv_heads = {"full_attention": 4 // TP, "sliding_attention": 8 // TP}
    sent_tokens = {"full_attention": tokens * 7 * (2 + 2), "sliding_attention": tokens * 7 * (2 + 2)}
    if exchange == "halo":
        sent_tokens["sliding_attention"] = 2 * window * (2 + 1)
    kinds = [kind.value for kind in cfg.model.layer_types()]
    busiest = kinds[:6] if exchange == "halo" else kinds[42:] + ["sliding_attention"]
    assert busiest.count("full_attention") == (2 if exchange == "halo" else 1)
    per_micro_batch = sum(sent_tokens[kind] * kv_heads[kind] * width * B for kind in busiest)
    assert cp.group_size == 8 and cp.bytes == round(256 * per_micro_batch)  # 256 micro-batches per step
    assert cp.between_nodes == pytest.approx(6 / 7)  # tp 4 x cp 8 spans 4 nodes: 2 of 8 cp ranks per node


@pytest.mark.parametrize("recipe", ["mimo_v2_flash_stage1", "mimo_v2_flash_stage2", "mimo_v2_flash_stage3"])
@pytest.mark.parametrize("cluster, world", [("h100_256", 256), ("h100_1024", 1024)])
def test_stage_recipes_fit_with_full_recomputation(recipe, cluster, world):
    cfg = load_config([f"cluster={cluster}"], config_name=recipe)
    assert estimate_memory(cfg, world_size=world, recompute=FULL_RECOMPUTE).fits
    assert not estimate_memory(cfg, world_size=world, recompute=Recompute()).fits


@pytest.mark.parametrize("cluster, world", [("h100_256", 256), ("h100_1024", 1024)])
def test_step_caps_cover_the_stages(cluster, world):
    """train.steps of each stage recipe is a cap above the cumulative steps to its stage's end."""
    needed = 0
    for recipe in ("mimo_v2_flash_stage1", "mimo_v2_flash_stage2", "mimo_v2_flash_stage3"):
        cfg = load_config([f"cluster={cluster}"], config_name=recipe)
        dp = world // (cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp)
        schedule = Schedule(
            cfg.schedule, optim=cfg.optim, train=cfg.train, model=cfg.model, batch_unit=cfg.train.micro_batch_size * dp
        )
        needed += schedule.steps_between(*schedule.stage_span)
        assert cfg.train.steps >= needed, recipe


def test_cli_refuses_a_layout_that_does_not_fit(capsys):
    assert main(["-c", "mimo_v2_flash_stage1", "cluster=h100_256", *NO_FP8_NO_RECOMPUTE, "--world-size", "256"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT: stage 1 needs" in out and "GiB more than the 79.6 GiB" in out
    assert "full (uniform, 1 layer(s)) activation recomputation  ->" in out


def test_cli_json_for_the_context_parallel_stage(capsys):
    assert main(["-c", "mimo_v2_flash_stage3", "cluster=h100_256", "--world-size", "256", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layout"]["cp"] == 8 and plan["layout"]["dp"] == 1 and plan["runs"] is True
    assert plan["memory"]["peak_bytes"] == max(stage["total"] for stage in plan["memory"]["stages"])
    assert "CP attention exchange" in [traffic["kind"] for traffic in plan["traffic"]]


def test_cli_accepts_the_tiny_default(capsys):
    assert main([]) == 0
    assert "fits: the fullest stage (0)" in capsys.readouterr().out


def test_invalid_layout_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["parallel.tp=3"])
    assert exit_info.value.code == 2
    assert "parallel.tp=3" in capsys.readouterr().err


def test_plan_error_names_the_layout_problem(stage1):
    with pytest.raises(PlanError, match="world size 100"):
        resolve_layout(stage1, 100)
