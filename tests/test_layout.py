"""validate_layout: each invalid layout is refused with a message naming its numbers and the key to change;
valid layouts resolve the implied degrees to the closed forms dp = world / (tp * pp * cp),
expert_dp = world / (etp * ep * pp), micro-batches = global / (micro * dp). No process group is involved."""

import subprocess
import sys

import pytest

from mimo.model.config import ModelConfig
from mimo.parallel.config import ParallelConfig
from mimo.parallel.layout import LayoutError, ResolvedLayout, validate_layout

BATCH = dict(global_batch_size=16, micro_batch_size=1, seq_length=32)


def _resolve(world: int, parallel: dict, model: dict = None, batch: dict = None) -> ResolvedLayout:
    return validate_layout(
        ParallelConfig(**parallel), ModelConfig(**(model or {})), world, **{**BATCH, **(batch or {})}
    )


def test_single_process_defaults():
    layout = _resolve(1, {})
    assert (layout.dp, layout.expert_dp, layout.num_microbatches) == (1, 1, 16)
    assert layout.sequence_parallel is False
    assert layout.stage_layers == (4,)


def test_tp_pp_ep_layout_resolves_data_parallel_sizes():
    layout = _resolve(8, dict(tp=2, pp=2, ep=4), batch=dict(global_batch_size=16, micro_batch_size=2))
    assert layout.dp == 8 // (2 * 2 * 1)
    assert layout.expert_dp == 8 // (1 * 4 * 2)
    assert layout.num_microbatches == 16 // (2 * layout.dp)
    assert layout.sequence_parallel is True, "None means on whenever tp > 1"
    assert layout.stage_layers == (2, 2)


def test_expert_tensor_parallel_shares_ranks_with_attention():
    layout = _resolve(8, dict(tp=2, ep=4, etp=2))
    assert (layout.dp, layout.expert_dp) == (4, 1)


def test_uneven_pipeline_stages():
    layout = _resolve(3, dict(pp=3, pipeline_first_stage_layers=1), model=dict(num_layers=7))
    assert layout.stage_layers == (1, 3, 3)
    layout = _resolve(
        3, dict(pp=3, pipeline_first_stage_layers=2, pipeline_last_stage_layers=1), model=dict(num_layers=7)
    )
    assert layout.stage_layers == (2, 4, 1)


def test_interleaved_pipeline_and_mtp_on_last_stage():
    layout = _resolve(2, dict(pp=2, vpp=2), model=dict(num_layers=8, mtp_num_layers=1))
    assert (layout.stage_layers, layout.vpp, layout.num_microbatches) == ((4, 4), 2, 16)


def test_context_parallel_ranks_come_out_of_data_parallelism():
    layout = _resolve(8, dict(tp=2, cp=2, ep=2))
    assert (layout.dp, layout.expert_dp, layout.num_microbatches) == (2, 4, 8)


def test_dense_model_may_turn_sequence_parallel_off():
    layout = _resolve(2, dict(tp=2, sequence_parallel=False), model=dict(num_experts=0))
    assert layout.sequence_parallel is False


INVALID = [
    pytest.param(6, dict(tp=2, pp=2), {}, {}, ["world size 6", "tp * pp * cp = 2 * 2 * 1 = 4"], id="world-vs-tp-pp"),
    pytest.param(6, dict(tp=2, ep=4), {}, {}, ["world size 6", "etp * ep * pp = 1 * 4 * 1 = 4"], id="expert-layout"),
    pytest.param(3, dict(ep=3), {}, {}, ["parallel.ep=3", "model.num_experts=8"], id="ep-vs-experts"),
    pytest.param(
        4,
        dict(tp=4),
        {},
        {},
        ["parallel.tp=4", "KV heads", "num_key_value_heads=2", "tp <= 2"],
        id="tp-exceeds-kv-heads",
    ),
    pytest.param(
        4,
        dict(tp=4),
        dict(num_attention_heads=6, num_key_value_heads=4),
        {},
        ["parallel.tp=4", "model.num_attention_heads=6"],
        id="tp-vs-heads",
    ),
    pytest.param(
        4,
        dict(tp=4),
        dict(num_key_value_heads=4, swa_num_key_value_heads=6),
        {},
        ["parallel.tp=4", "model.swa_num_key_value_heads=6"],
        id="tp-vs-swa-kv-heads",
    ),
    pytest.param(
        4,
        dict(tp=4),
        dict(num_key_value_heads=4, ffn_hidden_size=130),
        {},
        ["parallel.tp=4", "model.ffn_hidden_size=130"],
        id="tp-vs-ffn",
    ),
    pytest.param(
        4,
        dict(etp=4),
        dict(moe_ffn_hidden_size=30),
        {},
        ["parallel.etp=4", "model.moe_ffn_hidden_size=30"],
        id="etp-vs-moe-ffn",
    ),
    pytest.param(2, dict(ep=2), dict(num_experts=0), {}, ["parallel.ep=2", "no MoE layers"], id="ep-without-moe"),
    pytest.param(
        2,
        dict(tp=2, sequence_parallel=False),
        {},
        {},
        ["sequence_parallel=false", "parallel.tp=2", "MoE"],
        id="moe-tp-needs-sp",
    ),
    pytest.param(1, dict(sequence_parallel=True), {}, {}, ["sequence_parallel=true", "tp > 1"], id="sp-without-tp"),
    pytest.param(4, {}, {}, dict(global_batch_size=6), ["global_batch_size=6", "1 * 4 = 4"], id="global-batch"),
    pytest.param(8, dict(pp=8), {}, {}, ["parallel.pp=8", "model.num_layers=4"], id="pp-exceeds-layers"),
    pytest.param(2, dict(pp=2), dict(num_layers=5), {}, ["5 layers", "2 pipeline stages"], id="uneven-split"),
    pytest.param(
        2,
        dict(pp=2, pipeline_first_stage_layers=1, pipeline_last_stage_layers=2),
        {},
        {},
        ["hold 3 layers", "model.num_layers=4", "add up to 4"],
        id="first-last-leave-layers",
    ),
    pytest.param(
        1, dict(pp=1, pipeline_first_stage_layers=2), {}, {}, ["pipeline_first_stage_layers"], id="uneven-without-pp"
    ),
    pytest.param(1, dict(vpp=2), {}, {}, ["parallel.vpp=2", "parallel.pp > 1"], id="vpp-without-pp"),
    pytest.param(2, dict(pp=2, vpp=2), dict(num_layers=6), {}, ["holds 3 layers", "parallel.vpp=2"], id="stage-vs-vpp"),
    pytest.param(
        2,
        dict(pp=2, vpp=2),
        dict(num_layers=8),
        dict(global_batch_size=3),
        ["3 micro-batches", "parallel.pp=2"],
        id="interleaved-microbatches",
    ),
    pytest.param(
        3,
        dict(cp=3),
        {},
        {},
        ["train.seq_length=32", "2 * parallel.cp = 6", "two equal chunks"],
        id="context-parallel-chunks",
    ),
    pytest.param(
        8,
        dict(cp=2, tp=4),
        dict(num_attention_heads=8, num_key_value_heads=4, swa_num_key_value_heads=8),
        dict(seq_length=36),
        ["18 tokens", "parallel.tp=4", "multiple of 16"],
        id="sequence-parallel-split-under-cp",
    ),
    pytest.param(1, dict(tp=0), {}, {}, ["parallel.tp=0"], id="zero-degree"),
]


@pytest.mark.parametrize("world, parallel, model, batch, expected", INVALID)
def test_invalid_layout_names_the_numbers(world, parallel, model, batch, expected):
    with pytest.raises(LayoutError) as error:
        _resolve(world, parallel, model, batch)
    for fragment in expected:
        assert fragment in str(error.value)


def test_layout_module_imports_without_torch():
    """The planner validates layouts on machines and in processes that never load torch."""
    probe = "import sys, mimo.parallel, mimo.parallel.layout; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", probe], check=True)
