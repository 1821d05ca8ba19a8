"""Dense and MoE layers in any order (``model.moe_layer_pattern``): the config, its HF spellings, checkpoints of
the older spelling, the layout checks and the planner follow each layer's actual FFN, and the model computes and
mimo-eval reports what transformers does for an interleaved pattern on one rank, under PP2 and under TP2xEP2.

References: transformers' model and config, closed forms written here, and a pattern spelled by hand.
"""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import TopKRouter
from transformers import MiMoV2FlashConfig

from mimo.model.builder import build_model
from mimo.model.config import ModelConfig, ModelConfigError, PrecisionConfig
from mimo.model.hf.configs import hf_config_to_mimo, mimo_config_to_hf, read_hf_config
from mimo.model.hf.mapping import ShardLayout, hf_to_mimo
from mimo.parallel.backend_limits import check_backend_support
from mimo.parallel.config import ParallelConfig
from mimo.parallel.layout import LayoutError, validate_layout
from mimo.parallel.runtime import initialize, shutdown
from mimo.recipes import load_config
from mimo.train.checkpoint import CheckpointError
from mimo.train.checkpoint.manager import check_model_compatible, latest_checkpoint, read_meta
from mimo.train.expert_load import ExpertLoad
from mimo.train.records import CheckpointMeta, TrainState
from mimo.train.tools.convert.importer import import_hf
from mimo.train.tools.evaluate import evaluate
from mimo.train.tools.plan.memory import estimate_memory
from mimo.train.tools.plan.parameters import stage_params

from multirank import join_rendezvous, spawn_ranks
from tiny_hub import HF_INTERLEAVED, IMPORT_OVERRIDES, IMPORT_SEQ, make_tiny_hub, transformers_eval

INTERLEAVED = [0, 1, 1, 0]
"""tiny_hub.HF_INTERLEAVED's FFNs (1 = MoE)."""
RELATIVE = 1e-5
"""FP32 on both sides: losses and logits agree to float rounding, relative to their magnitude."""
TWO_RANK_LAYOUTS = ("parallel.pp=2", "parallel.tp=2 parallel.ep=2")


def test_a_pattern_and_the_shorthand_spell_the_same_model():
    shorthand = ModelConfig(num_dense_layers=1).validate()
    spelled = ModelConfig(num_dense_layers=3, moe_layer_pattern=[0, 1, 1, 1]).validate()
    assert spelled.moe_pattern() == shorthand.moe_pattern() == [0, 1, 1, 1]
    assert mimo_config_to_hf(spelled) == mimo_config_to_hf(shorthand)
    interleaved = ModelConfig(moe_layer_pattern=[1, 0, 0, 1]).validate()
    assert [interleaved.is_moe(layer) for layer in range(4)] == [True, False, False, True]
    assert interleaved.num_moe_layers == 2 and interleaved.moe_layers() == [0, 3]


@pytest.mark.parametrize(
    "pattern, message",
    [([0, 1, 1], r"moe_layer_pattern has 3 entries but model.num_layers=4"), ([0, 1, 2, 1], r"contains \[2\]")],
)
def test_a_wrong_pattern_is_refused_naming_the_key(pattern, message):
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig(moe_layer_pattern=pattern).validate()
    with pytest.raises(ModelConfigError, match=r"num_experts=0 but layers \[1, 3\] are MoE"):
        ModelConfig(moe_layer_pattern=[0, 1, 0, 1], num_experts=0).validate()


def test_hf_configs_carry_any_pattern_both_ways(tmp_path):
    cfg = hf_config_to_mimo(MiMoV2FlashConfig(**HF_INTERLEAVED))
    assert cfg.moe_layer_pattern == INTERLEAVED
    assert mimo_config_to_hf(cfg)["mlp_layer_types"] == HF_INTERLEAVED["mlp_layer_types"]
    dense_first = hf_config_to_mimo(
        MiMoV2FlashConfig(**{**HF_INTERLEAVED, "mlp_layer_types": ["dense"] * 2 + ["sparse"] * 2})
    )
    assert (dense_first.moe_layer_pattern, dense_first.num_dense_layers) == (None, 2), "recipes' shorthand"

    hub = mimo_config_to_hf(cfg)  # in the Hub's own spelling, whose moe_layer_freq is a per-layer list too
    for key in ("layer_types", "mlp_layer_types", "rope_parameters"):
        del hub[key]
    hub.update(hybrid_layer_pattern=[0, 1, 1, 0], moe_layer_freq=[1, 0, 0, 1])
    (tmp_path / "config.json").write_text(json.dumps(hub))
    assert hf_config_to_mimo(read_hf_config(tmp_path)).moe_pattern() == [1, 0, 0, 1]


def _meta(model: dict) -> CheckpointMeta:
    return CheckpointMeta(state=TrainState(), has_optimizer=False, world_size=1, layout={}, run={}, model=model)


def test_a_checkpoint_is_compared_by_the_pattern_its_spelling_resolves_to():
    written_before_the_pattern = {
        key: value for key, value in asdict(ModelConfig()).items() if key != "moe_layer_pattern"
    }
    check_model_compatible(_meta(written_before_the_pattern), ModelConfig(moe_layer_pattern=[0, 1, 1, 1]), Path("x"))
    check_model_compatible(
        _meta(asdict(ModelConfig(moe_layer_pattern=[0, 0, 1, 1]))), ModelConfig(num_dense_layers=2), Path("x")
    )
    with pytest.raises(CheckpointError, match=r"moe_layer_pattern .*checkpoint \[0, 1, 1, 1\], config \[0, 1, 1, 0\]"):
        check_model_compatible(_meta(written_before_the_pattern), ModelConfig(moe_layer_pattern=INTERLEAVED), Path("x"))


def _resolved(model: ModelConfig, **parallel):
    return validate_layout(
        ParallelConfig(**parallel), model, 2, global_batch_size=8, micro_batch_size=2, seq_length=128
    )


@pytest.mark.parametrize(
    "pattern, parallel, refused",
    [
        ([0, 1, 1, 0], dict(pp=2), None),
        ([0, 1, 1, 0], dict(pp=2, vpp=2), None),  # rank 0 holds layers 0 and 2
        ([0, 0, 1, 1], dict(pp=2), r"stage 0 holds only dense layers \[0, 1\].*at least 3 layers on the first"),
        ([1, 1, 0, 0], dict(pp=2), r"stage 1 holds only dense layers \[2, 3\] \(the MoE layers are \[0, 1\]\)"),
        ([0, 1, 0, 1], dict(pp=2, vpp=2), r"stage 0 holds only dense layers \[0, 2\]"),
    ],
)
def test_a_stage_without_moe_layers_is_refused_only_without_fused_adam(pattern, parallel, refused):
    layout = _resolved(ModelConfig(moe_layer_pattern=pattern), **parallel)
    check_backend_support(layout, ModelConfig(moe_layer_pattern=pattern), backend="nccl", fused_adam=True)
    if refused is None:
        check_backend_support(layout, ModelConfig(moe_layer_pattern=pattern), backend="gloo", fused_adam=False)
        return
    with pytest.raises(LayoutError, match=refused):
        check_backend_support(layout, ModelConfig(moe_layer_pattern=pattern), backend="gloo", fused_adam=False)


def test_expert_parallelism_needs_a_moe_layer_somewhere():
    with pytest.raises(LayoutError, match=r"no MoE layers.*\[0, 0, 0, 0\]"):
        _resolved(ModelConfig(moe_layer_pattern=[0, 0, 0, 0]), ep=2)
    _resolved(ModelConfig(moe_layer_pattern=[0, 0, 0, 1]), ep=2)


def test_the_planner_places_experts_where_the_pattern_puts_them():
    cfg = load_config(["model.moe_layer_pattern=[0,0,1,1]", "parallel.pp=2", "train.global_batch_size=8"])
    model = cfg.model
    layout = _resolved(model, pp=2)
    per_moe_layer = model.num_experts * 3 * model.hidden_size * model.moe_ffn_hidden_size  # gate, up, down
    assert [stage_params(model, layout, rank).experts for rank in range(2)] == [0, 2 * per_moe_layer]
    stages = estimate_memory(cfg, world_size=2, layout=layout).stages
    assert stages[0].moe_dispatch == 0 < stages[1].moe_dispatch


def test_expert_load_counts_the_moe_layers_wherever_they_lie():
    cfg = ModelConfig(moe_layer_pattern=[1, 0, 0, 1]).validate()
    initialize(ParallelConfig(), cfg, seed=0, global_batch_size=1, micro_batch_size=1, seq_length=1)
    try:
        model = build_model(cfg, ParallelConfig(), PrecisionConfig(), seq_length=IMPORT_SEQ, seed=0)[0]
        load = ExpertLoad([model], cfg, torch.device("cpu"))
        routers = sorted((m for m in model.modules() if isinstance(m, TopKRouter)), key=lambda r: r.layer_number)
        assert [router.layer_number - 1 for router in routers] == [0, 3]
        model(_parity_ids(), None, None)  # gradients enabled, as in a training forward: counted
        megatron = torch.stack([router.local_tokens_per_expert for router in routers]).double()
        assert torch.equal(load.counts, megatron) and megatron.sum() > 0
    finally:
        shutdown()


@pytest.fixture(scope="module")
def interleaved_hub(tmp_path_factory):
    """A random transformers model of HF_INTERLEAVED (vocabulary 256, smaller than mimo's default tokenizer's
    4096) with an MTP block, in Hub format."""
    return make_tiny_hub(tmp_path_factory.mktemp("hub_interleaved"), seed=1, hf_config=HF_INTERLEAVED)


@pytest.fixture(scope="module")
def interleaved_run(interleaved_hub, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "interleaved"
    import_hf(interleaved_hub.directory, out, IMPORT_OVERRIDES)
    return out


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    """Token ids only: mimo-eval reads them without a tokenizer (the default one is larger than the model's
    vocabulary)."""
    path = tmp_path_factory.mktemp("data") / "ids.jsonl"
    ids = torch.randint(
        0, HF_INTERLEAVED["vocab_size"], (3 * IMPORT_SEQ + 11,), generator=torch.Generator().manual_seed(6)
    )
    path.write_text(json.dumps({"input_ids": ids.tolist()}) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(interleaved_hub, ids_file):
    stream = json.loads(ids_file.read_text())["input_ids"]
    return transformers_eval(interleaved_hub, stream, IMPORT_SEQ)


def assert_matches(result: dict, expected) -> None:
    assert result["tokens"] == expected.tokens and result["mtp_tokens"] == expected.mtp_tokens
    assert result["loss"] == pytest.approx(expected.loss, rel=RELATIVE)
    assert result["mtp_loss"] == pytest.approx(expected.mtp_loss, rel=RELATIVE)
    assert result["mtp_acceptance"] == pytest.approx(expected.acceptance, abs=0.5 / expected.mtp_tokens)


def test_mimo_eval_of_an_interleaved_import_matches_transformers(interleaved_run, ids_file, reference):
    assert read_meta(latest_checkpoint(interleaved_run / "checkpoints")).model["moe_layer_pattern"] == INTERLEAVED
    assert_matches(asdict(evaluate(interleaved_run, ids_file, IMPORT_OVERRIDES)), reference)


def _two_rank_run(rank: int, ports: list[int], run: str, ids: str, hub_dir: str, out_dir: str) -> None:
    """mimo-eval under each two-rank layout, then the PP2 model's logits computed stage by stage."""
    results = {}
    for port, layout in zip(ports, TWO_RANK_LAYOUTS):
        join_rendezvous(rank, 2, port)
        results[layout] = asdict(evaluate(Path(run), Path(ids), [*IMPORT_OVERRIDES, *layout.split()]))
    join_rendezvous(rank, 2, ports[len(TWO_RANK_LAYOUTS)])
    results["pp2_logits"] = _pipeline_logits(Path(hub_dir))
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def _pipeline_logits(hub_dir: Path) -> torch.Tensor | None:
    """Stage 0 (layers 0-1) sends its hidden states to stage 1 (layers 2-3, final norm, head); the last rank
    returns the logits."""
    from safetensors.torch import load_file

    cfg = hf_config_to_mimo(MiMoV2FlashConfig(**HF_INTERLEAVED), base=ModelConfig(mtp_num_layers=0))
    parallel = ParallelConfig(pp=2)
    initialize(parallel, cfg, seed=0, global_batch_size=2, micro_batch_size=2, seq_length=IMPORT_SEQ)
    try:
        model = build_model(cfg, parallel, PrecisionConfig(), seq_length=IMPORT_SEQ)[0].eval()
        hub = {}
        for shard in sorted(hub_dir.glob("model-0*.safetensors")):
            hub.update(load_file(str(shard)))
        layout = ShardLayout.of_model(model)
        missing, unexpected = model.load_state_dict(dict(hf_to_mimo(hub.items(), cfg, layout)), strict=False)
        assert unexpected == [] and [key for key in missing if not key.endswith("_extra_state")] == []
        ids = _parity_ids()
        with torch.no_grad():
            if dist.get_rank() == 0:
                dist.send(model(ids, None, None).contiguous(), 1)
                return None
            hidden = torch.empty(IMPORT_SEQ, ids.shape[0], cfg.hidden_size)
            dist.recv(hidden, 0)
            model.set_input_tensor(hidden)
            return model(ids, None, None)
    finally:
        shutdown()


def _parity_ids() -> torch.Tensor:
    return torch.randint(0, HF_INTERLEAVED["vocab_size"], (2, IMPORT_SEQ), generator=torch.Generator().manual_seed(8))


@pytest.mark.system
def test_pp2_and_tp2_ep2_match_transformers(interleaved_hub, interleaved_run, ids_file, reference, tmp_path):
    spawn_ranks(
        _two_rank_run,
        2,
        str(interleaved_run),
        str(ids_file),
        str(interleaved_hub.directory),
        str(tmp_path),
        rendezvous=len(TWO_RANK_LAYOUTS) + 1,
    )
    results = torch.load(tmp_path / "rank1.pt")
    for layout in TWO_RANK_LAYOUTS:
        assert_matches(results[layout], reference)
    expected = interleaved_hub.logits(_parity_ids())
    assert (results["pp2_logits"] - expected).abs().max().item() <= RELATIVE * expected.abs().max().item()
    assert torch.load(tmp_path / "rank0.pt")["pp2_logits"] is None
