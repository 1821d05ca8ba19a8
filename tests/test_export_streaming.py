"""export-hf streams a checkpoint into safetensors: byte for byte what exporting a built model gave (the model
loaded from the checkpoint, its state_dict mapped with mimo_to_hf, the shards written by safetensors' own
``save_file``), whatever layout wrote the checkpoint; the result loads into transformers with the same logits and
carries the run's tokenizer. import-hf draws no random weights and points the run at the HF directory's tokenizer.
"""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, MiMoV2FlashForCausalLM

from mimo.data.train_tokenizer import SHIPPED_TOKENIZER_DIR
from mimo.model.builder import build_model
from mimo.model.config import ModelConfig, PrecisionConfig
from mimo.model.hf.mapping import checkpoint_tensors, mimo_to_hf
from mimo.parallel.config import ParallelConfig
from mimo.parallel.runtime import initialize, shutdown
from mimo.recipes import load_config
from mimo.recipes.compose import to_yaml
from mimo.train.build import run_record, start_runtime
from mimo.train.checkpoint.manager import CheckpointManager, latest_checkpoint, load_checkpoint, read_meta
from mimo.train.config import RUN_CONFIG_FILE
from mimo.train.records import TrainState
from mimo.train.tools.convert.exporter import export_hf
from mimo.train.tools.convert.hf_writer import PlannedTensor, ShardedSafetensorsWriter
from mimo.train.tools.convert.importer import import_hf

from multirank import join_rendezvous, spawn_ranks
from tiny_hub import IMPORT_OVERRIDES

RUN = (
    "model.moe_layer_pattern=[0,1,1,0]",
    "train.seq_length=32",
    "train.global_batch_size=4",
    "train.micro_batch_size=1",
)
SMALL_SHARDS = 1_000_000
"""Bytes per file that split the tiny model's 10 MB over several shards."""
OTHER_LAYOUTS = {"tp2_ep2": ("parallel.tp=2", "parallel.ep=2"), "pp2_vpp2": ("parallel.pp=2", "parallel.vpp=2")}
SAFETENSORS_METADATA = {"format": "pt"}
TEXT = "Streaming conversion keeps one tensor in memory."


def save_initial_checkpoint(run: Path, overrides: tuple[str, ...] = ()) -> None:
    """A run directory with the seeded initial model of RUN (the same weights under every layout) as a checkpoint
    and the config.yaml a training run writes."""
    cfg = load_config([f"run.dir={run}", *RUN, *overrides])
    runtime = start_runtime(cfg)
    try:
        chunks = build_model(cfg.model, cfg.parallel, cfg.precision, seq_length=cfg.train.seq_length, seed=cfg.run.seed)
        CheckpointManager(cfg.checkpoint, cfg.model, runtime.device).save(
            TrainState(), chunks, None, run_record(cfg, runtime)
        )
        if runtime.is_main:
            (run / RUN_CONFIG_FILE).write_text(to_yaml(cfg))
    finally:
        shutdown()


def built_model_export(checkpoint: Path, out: Path, max_shard_bytes: int) -> None:
    """The export as it was done before streaming: a single-rank model loaded from the checkpoint, its state_dict
    through mimo_to_hf, greedy shards in that order written by safetensors' save_file, save_pretrained's names."""
    cfg = ModelConfig(**read_meta(checkpoint).model)
    initialize(ParallelConfig(), cfg, seed=0, global_batch_size=1, micro_batch_size=1, seq_length=1)
    try:
        model = build_model(cfg, ParallelConfig(), PrecisionConfig(), seq_length=1)[0]
        load_checkpoint(checkpoint, [model], None, cfg)
        state = {name: tensor for name, tensor in model.state_dict().items() if not name.endswith("_extra_state")}
        tensors = [(name, tensor.clone()) for name, tensor in mimo_to_hf(state.items(), cfg)]
    finally:
        shutdown()
    shards, size = [[]], 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards, size = [*shards, []], 0
        shards[-1].append((name, tensor))
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    names = ["model.safetensors"] if len(shards) == 1 else names
    out.mkdir(parents=True)
    for name, shard in zip(names, shards):
        save_file(dict(shard), str(out / name), metadata=SAFETENSORS_METADATA)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for _, t in tensors)},
            "weight_map": {tensor: name for name, shard in zip(names, shards) for tensor, _ in shard},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def assert_same_files(actual: Path, expected: Path, pattern: str = "model*") -> None:
    files = sorted(path.name for path in expected.glob(pattern))
    assert files and sorted(path.name for path in actual.glob(pattern)) == files
    different = [name for name in files if (actual / name).read_bytes() != (expected / name).read_bytes()]
    assert different == []


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("runs") / "interleaved"
    save_initial_checkpoint(directory)
    return directory


def test_the_writer_writes_what_save_file_writes_in_any_order(tmp_path):
    generator = torch.Generator().manual_seed(0)
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    tensors = {
        f"{prefix}.{i}.weight": torch.randn(i % 3 + 1, 7 - i % 5, generator=generator).to(dtypes[i % len(dtypes)])
        for i, prefix in enumerate(["b", "a", "model.z", "model.a", "c", "lm_head", "a.b", "x"])
    }
    planned = [PlannedTensor(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()]
    with ShardedSafetensorsWriter(tmp_path / "streamed", planned, max_shard_bytes=10**6) as writer:
        for name in random.Random(1).sample(sorted(tensors), len(tensors)):
            writer.write(name, tensors[name])
        writer.finish()
    save_file(tensors, str(tmp_path / "expected.safetensors"), metadata=SAFETENSORS_METADATA)
    assert (tmp_path / "streamed" / "model.safetensors").read_bytes() == (
        tmp_path / "expected.safetensors"
    ).read_bytes()


def test_checkpoint_tensors_are_where_megatron_checkpoints_them():
    cfg = ModelConfig(moe_layer_pattern=[1, 0, 0, 1], mtp_num_layers=2).validate()
    initialize(ParallelConfig(), cfg, seed=0, global_batch_size=1, micro_batch_size=1, seq_length=1)
    try:
        model = build_model(cfg, ParallelConfig(), PrecisionConfig(), seq_length=8)[0]
        state = {name: tensor for name, tensor in model.state_dict().items() if not name.endswith("_extra_state")}
        sharded = model.sharded_state_dict()
    finally:
        shutdown()
    sources = checkpoint_tensors(cfg)
    assert [source.mimo for source in sources] == list(state), "export writes the state_dict's order"
    for source in sources:
        entry = sharded[source.mimo]
        piece = entry.build()[0] if isinstance(entry, ShardedTensorFactory) else entry
        assert (piece.key, tuple(state[source.mimo].shape)) == (source.key, source.shape)
        assert piece.global_offset[: piece.prepend_axis_num] == (() if source.expert is None else (source.expert,))


@pytest.mark.parametrize("max_shard_bytes", [SMALL_SHARDS, 5 * 10**9], ids=["sharded", "one_file"])
def test_export_is_byte_identical_to_exporting_the_built_model(run, tmp_path, max_shard_bytes):
    export_hf(run, tmp_path / "streamed", max_shard_bytes)
    built_model_export(latest_checkpoint(run / "checkpoints"), tmp_path / "built", max_shard_bytes)
    assert_same_files(tmp_path / "streamed", tmp_path / "built")


def test_an_all_dense_model_checkpoints_and_exports(tmp_path):
    """Without MoE layers too, every layer has checkpoint keys of its own (GA and SWA layers differ in shape)."""
    save_initial_checkpoint(tmp_path / "run", ("model.moe_layer_pattern=[0,0,0,0]",))
    export_hf(tmp_path / "run", tmp_path / "streamed")
    built_model_export(latest_checkpoint(tmp_path / "run" / "checkpoints"), tmp_path / "built", 5 * 10**9)
    assert_same_files(tmp_path / "streamed", tmp_path / "built")


def test_export_loads_into_transformers_with_the_same_logits_and_the_runs_tokenizer(run, tmp_path):
    export_hf(run, tmp_path / "hf")
    checkpoint = latest_checkpoint(run / "checkpoints")
    cfg = ModelConfig(**read_meta(checkpoint).model)
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    initialize(ParallelConfig(), cfg, seed=0, global_batch_size=2, micro_batch_size=2, seq_length=32)
    try:
        model = build_model(cfg, ParallelConfig(), PrecisionConfig(), seq_length=32)[0].eval()
        load_checkpoint(checkpoint, [model], None, cfg)
        with torch.no_grad():
            expected = model(ids, None, None)
    finally:
        shutdown()
    with torch.no_grad():
        actual = MiMoV2FlashForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
    assert (actual - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    shipped = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER_DIR)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(TEXT) == shipped.encode(TEXT)


def test_import_draws_no_random_weights_and_records_the_hub_tokenizer(hub, tmp_path, monkeypatch):
    source = tmp_path / "hub_with_tokenizer"
    shutil.copytree(hub.directory, source)
    AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER_DIR).save_pretrained(source)

    def no_draws(*args, **kwargs):
        raise AssertionError("import-hf drew random weights")

    monkeypatch.setattr("mimo.model.builder.initialize_weights", no_draws)
    monkeypatch.setattr(torch.nn.init, "normal_", no_draws)  # megatron's init_method (and the sinks') draw with it
    import_hf(source, tmp_path / "run", IMPORT_OVERRIDES)
    assert f"tokenizer: {source}" in (tmp_path / "run" / RUN_CONFIG_FILE).read_text()

    export_hf(tmp_path / "run", tmp_path / "hf")
    exported = {}
    for file in (tmp_path / "hf").glob("*.safetensors"):
        exported.update(load_file(str(file)))
    assert sorted(exported) == sorted(hub.tensors) and all(torch.equal(exported[k], hub.tensors[k]) for k in exported)
    assert (tmp_path / "hf" / "tokenizer.json").exists()


def _save_under_other_layouts(rank: int, ports: list[int], root: str) -> None:
    for port, (name, overrides) in zip(ports, OTHER_LAYOUTS.items()):
        join_rendezvous(rank, 2, port)
        save_initial_checkpoint(Path(root) / name, overrides)


@pytest.mark.system
def test_checkpoints_of_other_layouts_export_the_same_bytes(run, tmp_path):
    spawn_ranks(_save_under_other_layouts, 2, str(tmp_path), rendezvous=len(OTHER_LAYOUTS))
    export_hf(run, tmp_path / "single_rank", SMALL_SHARDS)
    for name in OTHER_LAYOUTS:
        assert read_meta(latest_checkpoint(tmp_path / name / "checkpoints")).world_size == 2
        export_hf(tmp_path / name, tmp_path / f"{name}_hf", SMALL_SHARDS)
        assert_same_files(tmp_path / f"{name}_hf", tmp_path / "single_rank", "*")
