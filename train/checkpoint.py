"""Sharded checkpoints with megatron-core dist_checkpointing, safe against kills and reshardable across layouts.

A save is written into ``<dir>/step_NNNNNNN.partial`` and renamed to ``step_NNNNNNN`` only once every rank has
finished; the ``latest`` file is then replaced atomically. A kill at any moment therefore leaves the previous
checkpoint as the latest one, complete. The optimizer state is saved in the fully reshardable format so a run can
resume under another tensor/pipeline/expert/data-parallel layout.
"""

import json
import logging
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer
from torch.distributed.checkpoint import FileSystemReader

from mimo.model.config import ModelConfig

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATEST_FILE = "latest"
META_FILE = "mimo_checkpoint.json"
PARTIAL_SUFFIX = ".partial"
KEEP_MARKER = "KEEP"
"""A checkpoint holding this file (the last one of a schedule stage) is never removed by checkpoint.keep."""
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}

# Model settings a checkpoint's tensors do not depend on: a later stage may change them (RoPE theta, the
# scheduled loss weights and rates, the dispatcher); everything else must match the checkpoint.
RESHAPE_FREE_MODEL_FIELDS = frozenset(
    {
        "name",
        "rope_theta",
        "swa_rope_theta",
        "mtp_loss_weight",
        "moe_aux_loss_coeff",
        "moe_router_bias_update_rate",
        "moe_token_dispatcher",
        "moe_grouped_gemm",
        "max_position_embeddings",
        "init_method_std",
        "recompute_granularity",
        "recompute_method",
        "recompute_num_layers",
        "recompute_modules",
    }
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; nothing has been loaded into the model or optimizer."""


@dataclass
class TrainState:
    """Where the run is: restored exactly on resume so the schedule and data order continue seamlessly."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    stage: str = ""
    """The schedule stage the run was in; a resume into another stage is a stage transition."""
    data_stream: str = ""
    """What the samples are drawn from (mixture and sequence length); when it changes, a new stream starts."""
    data_start_samples: int = 0
    """consumed_samples when the current data stream began: the stream's own position is counted from here."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def latest_checkpoint(ckpt_dir: str) -> Path | None:
    """The newest complete checkpoint under ``ckpt_dir``, or None for a fresh run."""
    pointer = Path(ckpt_dir) / LATEST_FILE
    if not pointer.exists():
        return None
    path = Path(ckpt_dir) / pointer.read_text().strip()
    if not (path / META_FILE).exists():
        raise CheckpointError(
            f"{pointer} names {path.name}, which is missing or incomplete (no {META_FILE}); "
            f"point checkpoint.dir at a directory with a valid checkpoint or delete {pointer} to start fresh"
        )
    return path


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path / META_FILE}: {err}") from err
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {meta.get('format')!r}; this mimo reads format {FORMAT_VERSION}"
        )
    return meta


def check_model_compatible(meta: dict[str, Any], model: ModelConfig, path: Path) -> None:
    """Refuse a checkpoint whose tensors cannot fit the configured model, naming every differing key."""
    saved = meta.get("model", {})
    current = asdict(model)
    differences = [
        f"model.{key}: checkpoint {saved.get(key)!r}, config {value!r}"
        for key, value in current.items()
        if key not in RESHAPE_FREE_MODEL_FIELDS and key in saved and saved[key] != value
    ]
    if differences:
        raise CheckpointError(
            f"checkpoint {path} was written for another model architecture:\n  "
            + "\n  ".join(differences)
            + "\nset these keys to the checkpoint's values or start from a matching checkpoint"
        )


def _unwrapped(chunk: torch.nn.Module) -> torch.nn.Module:
    """Checkpoints hold the model's own names, not those of the data-parallel wrapper around it."""
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def _model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    # Layer keys inside are global (megatron offsets them per pipeline stage), so the nesting by chunk does
    # not tie the checkpoint to a pipeline layout.
    # An empty metadata dict is filled in place with the data-parallel group, which the MTP block's tied
    # embedding copy needs on a pipeline stage without the embedding.
    return {f"model{i}": _unwrapped(chunk).sharded_state_dict(metadata={}) for i, chunk in enumerate(model_chunks)}


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "accelerator": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "model_parallel": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["accelerator"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["accelerator"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["model_parallel"])


def _rng_sharded_object(state: dict[str, Any] | None) -> ShardedObject:
    """RNG streams are per rank, so they are saved as one object per global rank."""
    return ShardedObject("rng_state", state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def save_checkpoint(
    ckpt_dir: str,
    state: TrainState,
    model_chunks: Sequence[torch.nn.Module],
    optimizer: MegatronOptimizer | None,
    model_config: ModelConfig,
    layout: dict[str, Any],
    run: dict[str, Any],
    keep: int,
    permanent: bool = False,
) -> Path:
    """Write a complete checkpoint, then make it the latest; older ones beyond ``keep`` are removed."""
    root = Path(ckpt_dir)
    final = root / step_dir_name(state.step)
    partial = root / (final.name + PARTIAL_SUFFIX)
    is_writer = dist.get_rank() == 0
    if is_writer:
        shutil.rmtree(partial, ignore_errors=True)  # debris of a save that was killed
        partial.mkdir(parents=True)
    dist.barrier()

    sharded = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=False, metadata=OPTIMIZER_SHARDING)
    sharded["rng_state"] = _rng_sharded_object(_rng_state())
    dist_checkpointing.save(sharded, str(partial), content_metadata=OPTIMIZER_SHARDING)

    if is_writer:
        meta = {
            "format": FORMAT_VERSION,
            **asdict(state),
            "has_optimizer": optimizer is not None,
            "world_size": dist.get_world_size(),
            "layout": layout,
            "run": run,
            "model": asdict(model_config),
        }
        (partial / META_FILE).write_text(json.dumps(meta, indent=2))
        if permanent:
            (partial / KEEP_MARKER).touch()
    dist.barrier()
    if is_writer:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _atomic_write(root / LATEST_FILE, final.name)
        _remove_old(root, keep, final.name)
    dist.barrier()
    return final


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove_old(root: Path, keep: int, newest: str) -> None:
    complete = sorted(
        p for p in root.glob("step_*") if not p.name.endswith(PARTIAL_SUFFIX) and not (p / KEEP_MARKER).exists()
    )
    for old in complete[: max(0, len(complete) - keep)]:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: Path,
    model_chunks: Sequence[torch.nn.Module],
    optimizer: MegatronOptimizer | None,
    model_config: ModelConfig,
    layout: dict[str, Any],
) -> TrainState:
    """Load everything a resume needs, or raise CheckpointError having changed nothing.

    A checkpoint without optimizer state (a converted one) initialises the optimizer fresh. RNG streams are
    restored only under the same layout: they are per rank and have no meaning in another one.
    """
    meta = read_meta(path)
    check_model_compatible(meta, model_config, path)
    verify_files(path)
    same_layout = meta.get("layout") == layout and meta.get("world_size") == dist.get_world_size()
    load_optimizer = optimizer is not None and meta.get("has_optimizer", False)

    sharded = _model_sharded_state_dict(model_chunks)
    if load_optimizer:
        _allocate_optimizer_state(optimizer)
        content_metadata = dist_checkpointing.load_content_metadata(str(path)) or OPTIMIZER_SHARDING
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True, metadata=content_metadata)
    if same_layout:
        sharded["rng_state"] = _rng_sharded_object(None)
    try:
        # Everything this model asks for must be in the checkpoint; what it deliberately leaves (optimizer state
        # of a converted checkpoint, RNG streams of another layout) may stay unread.
        loaded = dist_checkpointing.load(sharded, str(path), strict=StrictHandling.RAISE_UNEXPECTED)
    except Exception as err:  # dist_checkpointing raises many types; all mean the same to the user
        raise CheckpointError(
            f"cannot load checkpoint {path}: {err}\nthe checkpoint is corrupt or does not match this model; "
            "nothing was loaded"
        ) from err

    for i, chunk in enumerate(model_chunks):
        _unwrapped(chunk).load_state_dict(loaded[f"model{i}"])
    if load_optimizer:
        with torch.no_grad():  # main parameters are views of leaf tensors under the distributed optimizer
            optimizer.load_state_dict(loaded["optimizer"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return TrainState(**{key: meta[key] for key in TrainState.__dataclass_fields__ if key in meta})


def verify_files(path: Path) -> None:
    """Refuse a checkpoint with missing or truncated shard files before any byte is read into the model.

    The storage metadata records where every tensor lives (file, offset, length); a file shorter than what it
    must hold means an interrupted copy or a damaged disk.
    """
    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as err:  # a missing or unreadable .metadata file
        raise CheckpointError(f"cannot read the shard index of {path}: {err}") from err
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        actual = shard.stat().st_size if shard.exists() else None
        if actual is None or actual < size:
            raise CheckpointError(
                f"checkpoint shard {shard} is "
                f"{'missing' if actual is None else f'truncated ({actual} of {size} bytes)'}; "
                "the checkpoint is damaged: restore it or point checkpoint.dir at another one"
            )


def _allocate_optimizer_state(optimizer: MegatronOptimizer) -> None:
    """Give a fresh optimizer the state tensors a checkpoint is loaded into.

    Torch's Adam creates its moments and step counter lazily at the first step, but megatron's distributed
    optimizer describes (and asserts) them when building the state dict to load into.
    """
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = part.optimizer
        part.init_state_fn(inner, part.config)
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param].setdefault("step", torch.zeros((), dtype=torch.float32))


def describe_changes(saved: dict[str, Any], current: dict[str, Any], separator: str = ": ") -> list[str]:
    """``key: old -> new`` for every setting of ``current`` that differs from what the checkpoint saved."""
    return [f"{key}{separator}{saved.get(key)} -> {value}" for key, value in current.items() if saved.get(key) != value]
