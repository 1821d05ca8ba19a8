"""The mimo model computes what transformers' MiMoV2FlashForCausalLM computes, on the same (Hub-named) weights.

The reference model is random and small but has every feature: GA and SWA layers, sinks (nonzero), value scale,
partial RoPE with two bases, a dense layer then MoE layers with a nonzero expert-bias, untied head, and
sequences longer than the window. Its weights go through ``save_pretrained`` so the mapping reads real Hub names.

The sharded test runs the same comparison on two gloo ranks with tensor parallelism 2 (with sequence parallelism)
and expert parallelism 2, each rank loading only its slice of the Hub tensors, for a model whose dense and MoE
layers interleave (``tiny_hub.HF_INTERLEAVED``; dense-first models run under TP2xEP2 in test_convert and
test_evaluate).
"""

import pytest
import torch
from megatron.core import dist_checkpointing
from safetensors.torch import load_file, save_file
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

from mimo.model.builder import build_model
from mimo.model.config import ModelConfig, PrecisionConfig
from mimo.model.hf.configs import hf_config_to_mimo, mimo_config_to_hf
from mimo.model.hf.mapping import ShardLayout, hf_to_mimo, mimo_to_hf
from mimo.parallel.config import ParallelConfig
from mimo.parallel.runtime import initialize, shutdown

from multirank import spawn_ranks
from tiny_hub import HF_INTERLEAVED, make_mtp_block, randomize_sinks_and_expert_biases

SEQ = 40
BATCH = 2
TOLERANCE = 1e-4
HF_TINY = {**HF_INTERLEAVED, "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]}
"""tiny_hub's interleaved model with the released pattern: one dense layer, then MoE layers."""


def random_hf_model(hf_config: dict) -> MiMoV2FlashForCausalLM:
    torch.manual_seed(0)
    model = MiMoV2FlashForCausalLM(MiMoV2FlashConfig(**hf_config)).eval()
    randomize_sinks_and_expert_biases(model.model.layers)
    return model


def saved_tensors(model: MiMoV2FlashForCausalLM, directory) -> dict[str, torch.Tensor]:
    """The reference weights in Hub naming, as ``save_pretrained`` writes them."""
    model.save_pretrained(directory)
    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model(HF_TINY)


@pytest.fixture(scope="module")
def hub_tensors(hf_model, tmp_path_factory):
    return saved_tensors(hf_model, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def interleaved_model():
    return random_hf_model(HF_INTERLEAVED)


@pytest.fixture(scope="module")
def interleaved_tensors(interleaved_model, tmp_path_factory):
    return saved_tensors(interleaved_model, tmp_path_factory.mktemp("hf_interleaved"))


def mimo_from_hub(cfg: ModelConfig, tensors) -> torch.nn.Module:
    model = build_model(cfg, ParallelConfig(), PrecisionConfig(), seq_length=SEQ)[0]
    missing, unexpected = model.load_state_dict(dict(hf_to_mimo(tensors.items(), cfg)), strict=False)
    assert unexpected == []
    assert [key for key in missing if not key.endswith("_extra_state")] == []
    return model.eval()


def parity_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def test_logits_match_transformers(single_rank, hf_model, hub_tensors):
    cfg = hf_config_to_mimo(hf_model.config, base=ModelConfig(mtp_num_layers=0))
    assert cfg.sliding_window + 1 == HF_TINY["sliding_window"] and cfg.sliding_window < SEQ
    model = mimo_from_hub(cfg, hub_tensors)
    ids = parity_ids(cfg.vocab_size)
    with torch.no_grad():
        expected = hf_model(ids).logits
        actual = model(ids, None, None)
        assert (actual - expected).abs().max().item() <= TOLERANCE
        # Packed documents: positions restart mid-sequence and RoPE follows them. (An explicit all-ones mask
        # stops transformers from also masking attention across documents, which mimo does not do.)
        positions = torch.cat([torch.arange(SEQ // 2), torch.arange(SEQ - SEQ // 2)]).expand(BATCH, SEQ)
        expected_packed = hf_model(ids, position_ids=positions, attention_mask=torch.ones(BATCH, SEQ)).logits
        assert (expected_packed - expected).abs().max().item() > 1e-2
        assert (model(ids, positions, None) - expected_packed).abs().max().item() <= TOLERANCE


def test_interleaved_dense_and_moe_layers_match_transformers(single_rank, interleaved_model, interleaved_tensors):
    cfg = hf_config_to_mimo(interleaved_model.config, base=ModelConfig(mtp_num_layers=0))
    assert cfg.moe_pattern() == [0, 1, 1, 0] and cfg.moe_layer_pattern == [0, 1, 1, 0]
    model = mimo_from_hub(cfg, interleaved_tensors)
    ids = parity_ids(cfg.vocab_size)
    with torch.no_grad():
        assert (model(ids, None, None) - interleaved_model(ids).logits).abs().max().item() <= TOLERANCE


def test_mtp_block_matches_reference_built_from_transformers_modules(single_rank, hf_model, hub_tensors):
    """MTP depth 1: final_norm(layer(eh_proj([enorm(emb(t[i+1])); hnorm(h_i)]))), layer = dense-FFN SWA + sink."""
    torch.manual_seed(5)
    block = make_mtp_block(HF_TINY)
    cfg = hf_config_to_mimo(hf_model.config, base=ModelConfig(mtp_num_layers=1))
    model = mimo_from_hub(cfg, {**hub_tensors, **block.tensors()})
    captured = {}
    model.mtp.register_forward_hook(lambda module, args, output: captured.setdefault("out", output))
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids, None, None, labels=ids)
        mtp_hidden = captured["out"][SEQ:].transpose(0, 1)  # main and MTP hidden states are concatenated on s
        expected = block.hidden(hf_model, ids)
    # The last position sees a rolled-in padding token instead of t[s]; it has no target anyway.
    assert (mtp_hidden[:, : SEQ - 1] - expected).abs().max().item() <= TOLERANCE
    # Without labels (evaluation) the model returns the main model's logits; MTP blocks only train.
    with torch.no_grad():
        assert (model(ids, None, None) - hf_model(ids).logits).abs().max().item() <= TOLERANCE


def test_export_round_trip_loads_into_transformers(single_rank, tmp_path):
    cfg = ModelConfig(num_layers=3, hybrid_layer_pattern=[0, 1, 1], vocab_size=256, mtp_num_layers=1).validate()
    model = build_model(cfg, ParallelConfig(), PrecisionConfig(), seq_length=SEQ)[0]
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    exported = dict(mimo_to_hf(state.items(), cfg))
    back = dict(hf_to_mimo(exported.items(), cfg))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[key], state[key]) for key in state)

    save_file({k: v.contiguous() for k, v in exported.items()}, str(tmp_path / "model.safetensors"))
    MiMoV2FlashConfig(**mimo_config_to_hf(cfg)).save_pretrained(tmp_path)
    loaded = MiMoV2FlashForCausalLM.from_pretrained(tmp_path)
    loaded.save_pretrained(tmp_path / "resaved")
    resaved = load_file(str(tmp_path / "resaved" / "model.safetensors"))
    main_keys = {key for key in exported if not key.startswith("model.mtp.")}
    assert resaved.keys() == main_keys
    assert all(torch.equal(resaved[key], exported[key]) for key in main_keys)


SHARDED = ParallelConfig(tp=2, ep=2)
SHARDED_RANKS = 2


def _sharded_rank(rank: int, ports: list[int], hub_path: str, out_dir: str) -> None:
    """One rank of the TP=2/EP=2 run: build, load this rank's slice, forward, save gathered logits."""
    cfg = hf_config_to_mimo(MiMoV2FlashConfig(**HF_INTERLEAVED), base=ModelConfig(mtp_num_layers=0))
    initialize(SHARDED, cfg, seed=3, global_batch_size=BATCH, micro_batch_size=BATCH, seq_length=SEQ)
    try:
        model = build_model(cfg, SHARDED, PrecisionConfig(), seq_length=SEQ)[0].eval()
        assert model.config.sequence_parallel
        layout = ShardLayout.of_model(model)
        assert (layout.tp_rank, layout.ep_rank) == (rank, rank)
        missing, unexpected = model.load_state_dict(
            dict(hf_to_mimo(load_file(hub_path).items(), cfg, layout)), strict=False
        )
        assert unexpected == [] and [key for key in missing if not key.endswith("_extra_state")] == []
        with torch.no_grad():
            logits = model(parity_ids(cfg.vocab_size), None, None, runtime_gather_output=True)
        sharded_state = model.sharded_state_dict()
        sink = sharded_state["decoder.layers.1.self_attention.core_attention.softmax_offset"]
        torch.save({"logits": logits, "sink": (sink.global_shape, sink.global_offset)}, f"{out_dir}/rank{rank}.pt")
        dist_checkpointing.save(sharded_state, f"{out_dir}/checkpoint")
    finally:
        shutdown()


@pytest.mark.system
def test_tp2_ep2_logits_match_transformers_and_checkpoint_reshards_to_one_rank(
    single_rank, interleaved_model, interleaved_tensors, tmp_path
):
    hf_model = interleaved_model
    hub_path = str(tmp_path / "hub.safetensors")
    save_file(dict(interleaved_tensors), hub_path)
    (tmp_path / "checkpoint").mkdir()
    spawn_ranks(_sharded_rank, SHARDED_RANKS, hub_path, str(tmp_path))
    with torch.no_grad():
        expected = hf_model(parity_ids(HF_INTERLEAVED["vocab_size"])).logits
    heads = HF_INTERLEAVED["num_attention_heads"]
    for rank in range(SHARDED_RANKS):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert (result["logits"] - expected).abs().max().item() <= TOLERANCE
        # The sink is checkpointed as this rank's heads of one global [heads] tensor.
        assert result["sink"] == ((heads,), (rank * heads // SHARDED_RANKS,))

    # The TP=2/EP=2 distributed checkpoint loads into a single-rank model (fused QKV, sinks, experts reshard).
    cfg = hf_config_to_mimo(hf_model.config, base=ModelConfig(mtp_num_layers=0))
    model = build_model(cfg, ParallelConfig(), PrecisionConfig(), seq_length=SEQ)[0].eval()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(tmp_path / "checkpoint")))
    with torch.no_grad():
        assert (model(parity_ids(cfg.vocab_size), None, None) - expected).abs().max().item() <= TOLERANCE
