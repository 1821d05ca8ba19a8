"""mimo-convert: HF checkpoints in (BF16/FP32 and the released FP8 format, one process or two ranks) and out.

The references are independent of the converter: the tensors transformers' ``save_pretrained`` wrote (a random
tiny MiMo-V2-Flash plus an MTP block in Hub naming, tests/tiny_hub.py), transformers' own forward pass on the
exported directory, and a block-quantiser/dequantiser written here.
"""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

from mimo.model.builder import build_model
from mimo.model.config import ModelConfig, PrecisionConfig
from mimo.model.hf.configs import hf_config_to_mimo
from mimo.model.hf.mapping import hf_names, hf_to_mimo, hub_tensor_shapes
from mimo.parallel.config import ParallelConfig
from mimo.parallel.runtime import initialize, shutdown
from mimo.recipes import load_config
from mimo.train import cli
from mimo.train.checkpoint.manager import latest_checkpoint, load_checkpoint, read_meta
from mimo.train.tools.convert.cli import main
from mimo.train.tools.convert.exporter import export_hf
from mimo.train.tools.convert.hf_files import ConvertError, HFCheckpoint
from mimo.train.tools.convert.importer import check_tensors, import_hf, imported_model_config
from mimo.train.tools.evaluate import evaluate

from tiny_hub import FULL, HF_TINY, IMPORT_OVERRIDES, IMPORT_SEQ, SLIDING

SEQ = IMPORT_SEQ
SMALL = IMPORT_OVERRIDES
LOGITS_RELATIVE = 1e-5
"""FP32 logits of two implementations differ by summation order: ~1e-7 of their magnitude per operation."""
FP8_BLOCK = 128
FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value: each block is scaled so its largest magnitude maps to it."""


def read_hf_dir(directory: Path) -> dict:
    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    different = [
        name
        for name in expected
        if actual[name].dtype != expected[name].dtype or not torch.equal(actual[name], expected[name])
    ]
    assert different == []


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "ids.jsonl"
    tokens = torch.randint(0, HF_TINY["vocab_size"], (3 * SEQ + 7,), generator=torch.Generator().manual_seed(4))
    path.write_text(json.dumps({"input_ids": tokens.tolist()}) + "\n")
    return path


def test_expected_hub_tensors_are_those_transformers_writes(hub):
    cfg = hf_config_to_mimo(hub.model.config, base=ModelConfig(mtp_num_layers=1))
    shapes = hub_tensor_shapes(cfg)
    assert shapes == {name: tuple(tensor.shape) for name, tensor in hub.tensors.items()}
    assert sorted(hf_names(cfg)) == sorted(shapes)


def test_import_writes_a_run_and_exporting_it_gives_back_the_same_tensors(hub, imported, tmp_path):
    checkpoint = latest_checkpoint(str(imported / "checkpoints"))
    meta = read_meta(checkpoint)
    assert checkpoint.name == "step_0000000" and meta.state.step == 0 and not meta.has_optimizer
    base = dataclasses.replace(load_config(list(SMALL)).model, mtp_num_layers=1, name=hub.directory.name)
    expected_model = hf_config_to_mimo(hub.model.config, base=base)
    assert ModelConfig(**meta.model) == expected_model
    saved = (imported / "config.yaml").read_text()
    assert f"dir: {imported}" in saved and "num_layers: 3" in saved
    assert (imported / "recipes" / "model" / "imported.yaml").exists()

    files = export_hf(imported, tmp_path / "hf")
    tokenizer = {"tokenizer.json", "tokenizer_config.json"}  # the run's (shipped) tokenizer
    assert {path.name for path in files} == {"model.safetensors", "config.json", *tokenizer}
    assert_same_tensors(read_hf_dir(tmp_path / "hf"), hub.tensors)
    exported_config = MiMoV2FlashConfig.from_pretrained(tmp_path / "hf")
    for key in ("layer_types", "mlp_layer_types", "rope_parameters", "sliding_window", "n_routed_experts", "head_dim"):
        assert getattr(exported_config, key) == getattr(hub.model.config, key), key


@pytest.mark.system
def test_training_continues_from_the_import_and_the_export_loads_into_transformers(hub, imported, tmp_path, data_cache):
    run = tmp_path / "run"
    shutil.copytree(imported, run)
    overrides = [
        f"hydra.searchpath=[file://{run / 'recipes'}]",
        "model=imported",
        f"run.dir={run}",
        f"data.cache_dir={data_cache}",
        "train.steps=2",
        "logging.interval=1",
        *SMALL,
    ]
    assert cli.main(overrides) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in metrics] == [1, 2]
    assert all(math.isfinite(record["loss"]) and math.isfinite(record["mtp_loss"]) for record in metrics)
    checkpoint = latest_checkpoint(str(run / "checkpoints"))
    assert checkpoint.name == "step_0000002"

    hf_dir = tmp_path / "hf"
    export_hf(run, hf_dir, max_shard_bytes=200_000)
    assert (hf_dir / "model.safetensors.index.json").exists() and len(list(hf_dir.glob("*.safetensors"))) > 1
    exported = read_hf_dir(hf_dir)
    assert not torch.equal(exported["lm_head.weight"], hub.tensors["lm_head.weight"]), "training changed nothing?"

    cfg = ModelConfig(**read_meta(checkpoint).model)
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(7))
    initialize(ParallelConfig(), cfg, seed=0, global_batch_size=2, micro_batch_size=2, seq_length=SEQ)
    try:
        model = build_model(cfg, ParallelConfig(), PrecisionConfig(), seq_length=SEQ)[0].eval()
        load_checkpoint(checkpoint, [model], None, cfg)
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        with torch.no_grad():
            mimo_logits = model(ids, None, None)
    finally:
        shutdown()
    back = dict(hf_to_mimo(exported.items(), cfg))  # MTP block included: every trained tensor was exported
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)

    loaded = MiMoV2FlashForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        difference = (loaded(ids).logits - mimo_logits).abs().max().item()
    assert difference <= LOGITS_RELATIVE * mimo_logits.abs().max().item()


@pytest.mark.system
def test_two_rank_import_gives_the_single_rank_checkpoint(hub, imported, ids_file, tmp_path):
    """TP=2 (sequence parallel) x EP=2 under torchrun: each rank reads its slice; the checkpoint is the same."""
    out = tmp_path / "two_ranks"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "mimo.train.tools.convert",
        "import-hf",
        str(hub.directory),
        str(out),
        *SMALL,
        "parallel.tp=2",
        "parallel.ep=2",
    ]
    job = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600
    )
    assert job.returncode == 0, job.stderr[-5000:]
    layout = read_meta(latest_checkpoint(str(out / "checkpoints"))).layout
    assert (layout["world_size"], layout["tp"], layout["ep"]) == (2, 2, 2)

    assert evaluate(out, ids_file, SMALL).loss == evaluate(imported, ids_file, SMALL).loss
    export_hf(out, tmp_path / "hf")
    assert_same_tensors(read_hf_dir(tmp_path / "hf"), hub.tensors)


def quantize(weight: torch.Tensor) -> tuple:
    """float8_e4m3fn values and per-128x128-block FP32 scales (dequantised = fp8 * scale)."""
    rows, cols = weight.shape
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scales = torch.empty(math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK))
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = (slice(i * FP8_BLOCK, (i + 1) * FP8_BLOCK), slice(j * FP8_BLOCK, (j + 1) * FP8_BLOCK))
            scales[i, j] = weight[block].abs().max() / FP8_MAX
            quantized[block] = (weight[block] / scales[i, j]).to(torch.float8_e4m3fn)
    return quantized, scales


def dequantize(quantized: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    weight = torch.empty(quantized.shape, dtype=torch.float32)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = (slice(i * FP8_BLOCK, (i + 1) * FP8_BLOCK), slice(j * FP8_BLOCK, (j + 1) * FP8_BLOCK))
            weight[block] = quantized[block].float() * scales[i, j]
    return weight


def released_style(name: str, tensor: torch.Tensor) -> bool:
    """As in the release: FP8 for 2-D projections except o_proj, embedding, LM head and the router."""
    keep = ("o_proj", "embed_tokens", "lm_head", "mlp.gate.weight")
    return tensor.dim() == 2 and not any(part in name for part in keep)


def test_fp8_checkpoint_in_hub_spelling_is_dequantised_exactly(tmp_path):
    # A width above one 128-block, not a multiple of it: the dense FFN weights have partial edge blocks.
    fp8_tiny = {**HF_TINY, "vocab_size": 256, "intermediate_size": 320}
    torch.manual_seed(3)
    source = tmp_path / "source"
    MiMoV2FlashForCausalLM(MiMoV2FlashConfig(**fp8_tiny)).save_pretrained(source)
    original = read_hf_dir(source)
    stored, expected = {}, {}
    for name, tensor in original.items():
        if released_style(name, tensor):
            stored[name], stored[name + "_scale_inv"] = quantize(tensor)
            expected[name] = dequantize(stored[name], stored[name + "_scale_inv"])
        else:
            stored[name] = expected[name] = tensor
    assert stored["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (3, 1)
    fp8_dir = tmp_path / "fp8"
    fp8_dir.mkdir()
    save_file(stored, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    hub_config = {  # the original (remote-code) spelling of the released config.json
        "architectures": ["MiMoV2FlashForCausalLM"],
        "model_type": "mimo_v2_flash",
        "auto_map": {"AutoConfig": "x.y"},
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 320,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 4,
        "head_dim": 24,
        "v_head_dim": 16,
        "swa_head_dim": 24,
        "swa_v_head_dim": 16,
        "hybrid_layer_pattern": [0, 1, 1],
        "moe_layer_freq": [0, 1, 1],
        "sliding_window_size": 8,
        "rope_theta": 640000.0,
        "swa_rope_theta": 10000.0,
        "partial_rotary_factor": 0.334,
        "add_swa_attention_sink_bias": True,
        "add_full_attention_sink_bias": False,
        "attention_value_scale": 0.707,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "n_shared_experts": None,
        "scoring_func": "sigmoid",
        "routed_scaling_factor": None,
        "layernorm_epsilon": 1e-5,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
    }
    (fp8_dir / "config.json").write_text(json.dumps(hub_config))

    run = tmp_path / "run"
    import_hf(fp8_dir, run, SMALL)
    meta_model = ModelConfig(**read_meta(latest_checkpoint(str(run / "checkpoints"))).model)
    transformers_config = MiMoV2FlashConfig(**fp8_tiny)
    assert [t.value for t in meta_model.layer_types()] == [FULL, SLIDING, SLIDING]
    base = dataclasses.replace(load_config(list(SMALL)).model, mtp_num_layers=0, name=fp8_dir.name)
    assert meta_model == hf_config_to_mimo(transformers_config, base=base)
    export_hf(run, tmp_path / "hf")
    assert_same_tensors(read_hf_dir(tmp_path / "hf"), expected)


def test_mismatched_tensors_are_refused_with_their_names_before_anything_is_written(hub, tmp_path, capsys):
    broken = dict(hub.tensors)
    del broken["model.layers.1.mlp.experts.3.down_proj.weight"]
    broken["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    broken["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(40, HF_TINY["hidden_size"])
    broken["model.layers.0.self_attn.q_proj.weight_scale_inv"] = torch.ones(1, 1)
    directory = tmp_path / "broken"
    directory.mkdir()
    shutil.copy(hub.directory / "config.json", directory)
    save_file(broken, str(directory / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"

    assert main(["import-hf", str(directory), str(out), *SMALL]) == 2
    message = capsys.readouterr().err
    for text in (
        "missing from the checkpoint (1)",
        "model.layers.1.mlp.experts.3.down_proj.weight",
        "in the checkpoint but not in the model (1)",
        "model.layers.0.mlp.extra_proj.weight",
        "model.layers.2.self_attn.k_proj.weight: checkpoint [40, 64], model [96, 64]",
        "model.layers.0.self_attn.q_proj.weight_scale_inv: a scale without an FP8 weight",
    ):
        assert text in message
    assert not out.exists()


def test_import_into_a_run_with_checkpoints_is_refused(hub, imported):
    with pytest.raises(ConvertError, match="already holds a checkpoint"):
        import_hf(hub.directory, imported, SMALL)


def test_mtp_blocks_follow_the_checkpoint_unless_model_mtp_num_layers_is_given(hub):
    def model(*overrides):
        base = load_config([*SMALL, *overrides]).model
        return imported_model_config(hub.model.config, base, hf.weights(), overrides, "hub")

    with HFCheckpoint(hub.directory) as hf:
        assert model().mtp_num_layers == 1
        fewer = model("model.mtp_num_layers=0")
        assert fewer.mtp_num_layers == 0
        assert check_tensors(hf, fewer) == sorted(n for n in hf.weights() if n.startswith("model.mtp.layers.0."))
        with pytest.raises(ConvertError, match=r"missing from the checkpoint \(14\):\n    model\.mtp\.layers\.1\."):
            check_tensors(hf, model("model.mtp_num_layers=2"))
