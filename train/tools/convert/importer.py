"""``mimo-convert import-hf``: a Hugging Face MiMo-V2-Flash directory into a mimo run directory.

The mimo model is built under the requested layout (one process or ``torchrun``) without any random
initialisation, each rank reading only the tensors it holds, and written as a checkpoint that ``mimo-train``
resumes from at step 0 with a fresh optimizer. The HF directory's tokenizer, when it has one, is recorded as the
run's ``data.tokenizer``.
"""

import dataclasses
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mimo.data.tokenizer import has_tokenizer
from mimo.model.builder import build_model
from mimo.model.config import ModelConfig
from mimo.model.hf.configs import hf_config_to_mimo, read_hf_config
from mimo.model.hf.mapping import ShardLayout, hf_names, hf_to_mimo, hub_tensor_shapes
from mimo.parallel.runtime import shutdown
from mimo.recipes.compose import load_config, to_yaml
from mimo.recipes.schema import MimoConfig
from mimo.train.build import run_record, start_runtime
from mimo.train.checkpoint.manager import CheckpointManager, latest_checkpoint
from mimo.train.config import RUN_CONFIG_FILE
from mimo.train.fault.run_lock import lock_run_dir
from mimo.train.records import TrainState
from mimo.train.tools.convert.hf_files import TOKENIZER_KEY, ConvertError, HFCheckpoint, fp8_block
from mimo.train.tools.convert.progress import TransferProgress

logger = logging.getLogger("mimo")

LISTED_NAMES = 50
"""Tensor names an error lists per kind of problem before it only counts the rest."""
IMPORTED_MODEL_GROUP = "imported"
"""import-hf writes the model as the recipe group option ``model=imported`` under OUT_DIR/recipes."""
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
    loaded = set()
    with torch.no_grad(), TransferProgress("importing", len(names), enabled=show_progress) as progress:
        for name, tensor in hf_to_mimo(progress.track((name, hf.read(name)) for name in names), cfg, layout):
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
    if not _given(overrides, TOKENIZER_KEY) and has_tokenizer(hf_dir):
        cfg.data.tokenizer = str(hf_dir)  # recorded in config.yaml: training, evaluation and export use it
    with HFCheckpoint(hf_dir, fp8_block(hf_config)) as hf:
        cfg.model = imported_model_config(hf_config, cfg.model, hf.weights(), overrides, hf_dir.name)
        dropped = check_tensors(hf, cfg.model)
        runtime = start_runtime(cfg)
        lock = None
        try:
            lock = lock_run_dir(out_dir, cfg.fault.lock_stale_minutes, runtime.is_main, runtime.device)
            if dropped:
                logger.info(
                    "leaving out %d tensors of MTP blocks beyond model.mtp_num_layers=%d",
                    len(dropped),
                    cfg.model.mtp_num_layers,
                )
            # Every tensor is loaded from the checkpoint next: no random draw (megatron's or mimo's) is needed.
            chunks = build_model(
                cfg.model, cfg.parallel, cfg.precision, seq_length=cfg.train.seq_length, random_init=False
            )
            for chunk in chunks:
                load_chunk(chunk, hf, cfg.model, show_progress=runtime.is_main)
            checkpoints = CheckpointManager(cfg.checkpoint, cfg.model, runtime.device)
            path = checkpoints.save(TrainState(), chunks, None, run_record(cfg, runtime))
            if runtime.is_main:
                _write_run_files(cfg, out_dir, config_name)
            return path
        finally:
            if lock is not None:
                lock.release()
            shutdown()


def _write_run_files(cfg: MimoConfig, out_dir: Path, config_name: str) -> None:
    """config.yaml as mimo-train writes it, and the model as a recipe group so a training command can name it."""
    (out_dir / RUN_CONFIG_FILE).write_text(to_yaml(cfg))
    group = out_dir / "recipes" / "model"
    group.mkdir(parents=True, exist_ok=True)
    (group / f"{IMPORTED_MODEL_GROUP}.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg.model)))
    recipe = f" -c {config_name}" if config_name != "config" else ""
    tokenizer = f" {TOKENIZER_KEY}={cfg.data.tokenizer}" if cfg.data.tokenizer else ""
    logger.info(
        "imported into %s; train on from it with (plus the recipe's other overrides):\n  mimo-train%s"
        " 'hydra.searchpath=[file://%s]' model=%s run.dir=%s%s",
        cfg.checkpoint.dir,
        recipe,
        out_dir / "recipes",
        IMPORTED_MODEL_GROUP,
        out_dir,
        tokenizer,
    )
