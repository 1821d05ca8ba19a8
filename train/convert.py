"""``mimo-convert``: Hugging Face MiMo-V2-Flash checkpoints in and out of mimo training checkpoints.

``import-hf`` builds the mimo model under the requested layout (one process or ``torchrun``), each rank reading
only the tensors it holds, and writes a checkpoint that ``mimo-train`` resumes from at step 0 with a fresh
optimizer. ``export-hf`` loads a checkpoint into one process (checkpoints reshard to any layout) and writes
safetensors and a config.json that ``MiMoV2FlashForCausalLM.from_pretrained`` loads, MTP blocks kept under
``model.mtp.layers.K.*`` for the inference engines.
"""

import argparse
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from mimo.model.builder import build_model
from mimo.model.config import ModelConfig, ModelConfigError, PrecisionConfig
from mimo.model.hf_mapping import (
    HFMappingError,
    ShardLayout,
    hf_config_to_mimo,
    hf_names,
    hf_to_mimo,
    mimo_config_to_hf,
    mimo_to_hf,
)
from mimo.parallel.config import ParallelConfig
from mimo.parallel.layout import LayoutError
from mimo.parallel.runtime import initialize, shutdown
from mimo.recipes import ConfigError, MimoConfig, load_config, to_yaml
from mimo.train.checkpoint import CheckpointError, TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from mimo.train.checkpoint_lookup import checkpoint_model, checkpoint_precision, resolve_checkpoint
from mimo.train.hf_checkpoint import (
    ConvertError,
    HFCheckpoint,
    fp8_block,
    hub_tensor_shapes,
    read_hf_config,
    save_sharded,
)
from mimo.train.loop import layout_record, run_record, setup_logging, start_runtime

logger = logging.getLogger("mimo")

BYTES_PER_GB = 10**9
DEFAULT_MAX_SHARD_GB = 5.0
"""Largest safetensors file export-hf writes, as transformers' save_pretrained does by default."""
LISTED_NAMES = 50
"""Tensor names an error lists per kind of problem before it only counts the rest."""
IMPORTED_MODEL_GROUP = "imported"
"""import-hf writes the model as the recipe group option ``model=imported`` under OUT_DIR/recipes."""
HF_ARCHITECTURE = "MiMoV2FlashForCausalLM"
HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
MTP_HUB_LAYER = re.compile(r"model\.mtp\.layers\.(\d+)\.")


def _given(overrides: Sequence[str], key: str) -> bool:
    """Whether the command line sets ``key`` (Hydra's ``+``/``++`` prefixes included)."""
    return any(re.match(rf"\+{{0,2}}{re.escape(key)}=", override) for override in overrides)


def _hub_mtp_layers(names: Iterable[str]) -> int:
    depths = [int(match.group(1)) for name in names if (match := MTP_HUB_LAYER.match(name))]
    return max(depths) + 1 if depths else 0


def imported_model_config(
    hf_config, base: ModelConfig, names: Iterable[str], overrides: Sequence[str], default_name: str
) -> ModelConfig:
    """The ModelConfig of an HF checkpoint: the architecture from config.json, training settings from the recipe.

    MTP blocks: as many as the checkpoint holds unless ``model.mtp_num_layers`` is given (fewer drops the extra
    blocks, as pre-training uses one of the three released).
    """
    if not _given(overrides, "model.mtp_num_layers"):
        base = dataclasses.replace(base, mtp_num_layers=_hub_mtp_layers(names))
    if not _given(overrides, "model.name"):
        base = dataclasses.replace(base, name=default_name)
    return hf_config_to_mimo(hf_config, base=base)


def _listing(title: str, entries: list[str]) -> str:
    shown = entries[:LISTED_NAMES]
    more = f"\n    ... and {len(entries) - len(shown)} more" if len(entries) > len(shown) else ""
    return f"  {title} ({len(entries)}):\n    " + "\n    ".join(shown) + more


def check_tensors(hf: HFCheckpoint, cfg: ModelConfig) -> list[str]:
    """Compare the checkpoint's tensors (names and shapes, headers only) with the model's; raise ConvertError
    listing every problem. Returns the MTP tensors beyond ``cfg.mtp_num_layers`` that the import leaves out."""
    expected = hub_tensor_shapes(cfg)
    present = hf.weights()
    dropped = sorted(
        name for name in present if (match := MTP_HUB_LAYER.match(name)) and int(match.group(1)) >= cfg.mtp_num_layers
    )
    missing = sorted(expected.keys() - present.keys())
    unexpected = sorted(present.keys() - expected.keys() - set(dropped))
    mismatched = [
        f"{name}: checkpoint {list(present[name])}, model {list(expected[name])}"
        for name in sorted(expected.keys() & present.keys())
        if tuple(present[name]) != expected[name]
    ]
    problems = [
        (title, entries)
        for title, entries in (
            ("missing from the checkpoint", missing),
            ("in the checkpoint but not in the model", unexpected),
            ("shapes differing", mismatched),
            ("FP8 quantisation", hf.quantization_problems()),
        )
        if entries
    ]
    if problems:
        raise ConvertError(
            f"{hf.directory} does not match the model its config.json (and the model.* overrides) describe;"
            " nothing was written:\n" + "\n".join(_listing(title, entries) for title, entries in problems)
        )
    return dropped


def load_chunk(chunk: torch.nn.Module, hf: HFCheckpoint, cfg: ModelConfig, show_progress: bool) -> None:
    """Copy the HF tensors this rank's chunk holds into it, reading nothing else."""
    layout = ShardLayout.of_model(chunk)
    names = hf_names(cfg, layout)
    state = {name: tensor for name, tensor in chunk.state_dict().items() if not name.endswith("_extra_state")}
    progress = tqdm(names, desc="importing", unit="tensor", disable=not show_progress)
    loaded = set()
    with torch.no_grad():
        for name, tensor in hf_to_mimo(((name, hf.read(name)) for name in progress), cfg, layout):
            target = state.get(name)
            if target is None or target.shape != tensor.shape:
                raise ConvertError(
                    f"mimo tensor {name}: the mapping gives shape {list(tensor.shape)} but this rank's model has"
                    f" {None if target is None else list(target.shape)} (layout {layout})"
                )
            target.copy_(tensor)
            loaded.add(name)
    never = sorted(state.keys() - loaded)
    if never:
        raise ConvertError(f"these model tensors have no HF counterpart and were not loaded: {never}")


def import_hf(hf_dir: Path, out_dir: Path, overrides: Sequence[str] = (), config_name: str = "config") -> Path:
    """Convert an HF checkpoint into a mimo run directory; returns the checkpoint written (step 0)."""
    hf_dir, out_dir = Path(hf_dir).resolve(), Path(out_dir).resolve()
    hf_config = read_hf_config(hf_dir)
    cfg: MimoConfig = load_config([*overrides, f"run.dir={out_dir}"], config_name=config_name)
    if latest_checkpoint(cfg.checkpoint.dir) is not None:
        raise ConvertError(
            f"{cfg.checkpoint.dir} already holds a checkpoint; import into a new directory so no run is overwritten"
        )
    with HFCheckpoint(hf_dir, fp8_block(hf_config)) as hf:
        cfg.model = imported_model_config(hf_config, cfg.model, hf.weights(), overrides, hf_dir.name)
        dropped = check_tensors(hf, cfg.model)
        runtime = start_runtime(cfg)
        try:
            setup_logging(runtime.is_main)
            if dropped:
                logger.info(
                    "leaving out %d tensors of MTP blocks beyond model.mtp_num_layers=%d",
                    len(dropped),
                    cfg.model.mtp_num_layers,
                )
            chunks = build_model(
                cfg.model, cfg.parallel, cfg.precision, seq_length=cfg.train.seq_length, seed=cfg.run.seed
            )
            for chunk in chunks:
                load_chunk(chunk, hf, cfg.model, show_progress=runtime.is_main)
            layout = layout_record(cfg, runtime)
            path = save_checkpoint(
                cfg.checkpoint.dir,
                TrainState(),
                chunks,
                None,
                cfg.model,
                layout,
                run_record(cfg, cfg.data, layout),
                cfg.checkpoint.keep,
            )
            if runtime.is_main:
                _write_run_files(cfg, out_dir, config_name)
            return path
        finally:
            shutdown()


def _write_run_files(cfg: MimoConfig, out_dir: Path, config_name: str) -> None:
    """config.yaml as mimo-train writes it, and the model as a recipe group so a training command can name it."""
    (out_dir / "config.yaml").write_text(to_yaml(cfg))
    group = out_dir / "recipes" / "model"
    group.mkdir(parents=True, exist_ok=True)
    (group / f"{IMPORTED_MODEL_GROUP}.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg.model)))
    recipe = f" -c {config_name}" if config_name != "config" else ""
    logger.info(
        "imported into %s; train on from it with (plus the recipe's other overrides):\n  mimo-train%s"
        " 'hydra.searchpath=[file://%s]' model=%s run.dir=%s",
        cfg.checkpoint.dir,
        recipe,
        out_dir / "recipes",
        IMPORTED_MODEL_GROUP,
        out_dir,
    )


def export_hf(
    ckpt_dir: Path, out_dir: Path, max_shard_bytes: int = int(DEFAULT_MAX_SHARD_GB * BYTES_PER_GB)
) -> list[Path]:
    """Write the latest (or the named) checkpoint as an HF directory; returns the files written."""
    from transformers import MiMoV2FlashConfig

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConvertError(
            "export-hf runs in one process (it reshards the checkpoint to one rank); launch it without torchrun"
        )
    checkpoint = resolve_checkpoint(ckpt_dir)
    model = checkpoint_model(checkpoint)
    hf_config = MiMoV2FlashConfig(**mimo_config_to_hf(model))  # refuses a model transformers cannot describe, early
    precision = PrecisionConfig(dtype=checkpoint_precision(checkpoint))
    single = ParallelConfig()
    runtime = initialize(single, model, seed=0, global_batch_size=1, micro_batch_size=1, seq_length=1)
    try:
        setup_logging(runtime.is_main)
        chunk = build_model(model, single, precision, seq_length=1)[0]
        layout = layout_record(MimoConfig(model=model, parallel=single), runtime)
        load_checkpoint(checkpoint, [chunk], None, model, layout)
        state = {name: tensor for name, tensor in chunk.state_dict().items() if not name.endswith("_extra_state")}
        out_dir = Path(out_dir)
        files = save_sharded(mimo_to_hf(state.items(), model), out_dir, max_shard_bytes, len(hub_tensor_shapes(model)))
        hf_config.architectures = [HF_ARCHITECTURE]
        hf_config.dtype = HF_DTYPES[precision.dtype]
        hf_config.save_pretrained(out_dir)
        logger.info("exported %s to %s (%d files)", checkpoint, out_dir, len(files))
        return files + [out_dir / "config.json"]
    finally:
        shutdown()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mimo-convert", description="Convert MiMo-V2-Flash checkpoints between Hugging Face and mimo formats."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    importer = commands.add_parser(
        "import-hf",
        help="HF directory (BF16/FP32, or the released FP8) -> mimo run directory",
        description="Read a transformers-format MiMo-V2-Flash directory (config.json + safetensors, single file or"
        " sharded; FP8 128x128-block weights are dequantised) and write OUT_DIR/checkpoints (step 0, no optimizer"
        " state), OUT_DIR/config.yaml and the model as recipe group OUT_DIR/recipes/model/imported.yaml. Runs in"
        " one process or under torchrun with the layout given by parallel.* overrides; each rank reads only its"
        " tensors. MTP blocks: all the checkpoint has, or model.mtp_num_layers=N of them.",
        epilog="example: torchrun --nproc-per-node 8 -m mimo.train.convert import-hf /ckpt/MiMo-V2-Flash runs/flash"
        " model.mtp_num_layers=1 precision.dtype=bf16 parallel.ep=8",
    )
    importer.add_argument("hf_dir", type=Path)
    importer.add_argument("out_dir", type=Path)
    importer.add_argument("--config-name", "-c", default="config", help="recipe the imported model trains with")
    importer.add_argument("overrides", nargs="*", metavar="key=value")
    exporter = commands.add_parser(
        "export-hf",
        help="mimo checkpoint -> HF directory that MiMoV2FlashForCausalLM.from_pretrained loads",
        description="Load a mimo checkpoint (a run directory, its checkpoints/ directory, or one step_N directory)"
        " into ONE process and write safetensors shards, their index and config.json. The whole model is held in"
        " memory: the full 309B model needs a machine with about 1.3 TB of RAM in FP32 (0.65 TB in BF16), the 3.4B"
        " proxy about 30 GB; the tiny model exports anywhere.",
    )
    exporter.add_argument("ckpt_dir", type=Path)
    exporter.add_argument("out_dir", type=Path)
    exporter.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_GB, help="largest file written (GB)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "import-hf":
            import_hf(args.hf_dir, args.out_dir, args.overrides, args.config_name)
        else:
            export_hf(args.ckpt_dir, args.out_dir, int(args.max_shard_gb * BYTES_PER_GB))
    except (ConfigError, ConvertError, HFMappingError, ModelConfigError, LayoutError, CheckpointError) as err:
        print(f"mimo-convert: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
