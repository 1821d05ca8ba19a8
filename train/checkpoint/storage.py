"""The tensors of a checkpoint: model chunks, optimizer state and per-rank RNG streams through megatron-core's
dist_checkpointing (torch_dist format), and a check of the shard files before anything is read.

The optimizer state is saved in the fully reshardable format so a run can resume under another
tensor/pipeline/expert/data-parallel layout.
"""

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer
from torch.distributed.checkpoint import FileSystemReader

from mimo.train.checkpoint import CheckpointError

OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}
RNG_KEY = "rng_state"


def unwrapped(chunk: torch.nn.Module) -> torch.nn.Module:
    """Checkpoints hold the model's own names, not those of the data-parallel wrapper around it."""
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def _model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    # Layer keys inside are global (megatron offsets them per pipeline stage), so the nesting by chunk does
    # not tie the checkpoint to a pipeline layout.
    # An empty metadata dict is filled in place with the data-parallel group, which the MTP block's tied
    # embedding copy needs on a pipeline stage without the embedding.
    return {f"model{i}": unwrapped(chunk).sharded_state_dict(metadata={}) for i, chunk in enumerate(model_chunks)}


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
    return ShardedObject(RNG_KEY, state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def save_tensors(
    directory: Path,
    model_chunks: list[torch.nn.Module],
    optimizer: MegatronOptimizer | None,
    async_save: bool = False,
) -> AsyncRequest | None:
    """Write this rank's part of the model, the optimizer state and the RNG streams into ``directory`` (all ranks
    call it together). With ``async_save`` nothing is written yet: the returned request writes it once scheduled
    (``mimo.train.checkpoint.background``), and its finalize functions complete the checkpoint on every rank."""
    sharded = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=False, metadata=OPTIMIZER_SHARDING)
    sharded[RNG_KEY] = _rng_sharded_object(_rng_state())
    return dist_checkpointing.save(
        sharded, str(directory), content_metadata=OPTIMIZER_SHARDING, async_sharded_save=async_save
    )


def load_tensors(
    directory: Path, model_chunks: list[torch.nn.Module], optimizer: MegatronOptimizer | None, restore_rng: bool
) -> None:
    """Load the model (and, when given, the optimizer; with ``restore_rng`` this rank's RNG streams) from
    ``directory``, or raise CheckpointError having changed nothing.

    RNG streams are per rank and have no meaning in another layout: the caller restores them only under the
    layout that saved them.
    """
    sharded = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        _allocate_optimizer_state(optimizer)
        content_metadata = dist_checkpointing.load_content_metadata(str(directory)) or OPTIMIZER_SHARDING
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True, metadata=content_metadata)
    if restore_rng:
        sharded[RNG_KEY] = _rng_sharded_object(None)
    try:
        # Everything this model asks for must be in the checkpoint; what it deliberately leaves (optimizer state
        # of a converted checkpoint, RNG streams of another layout) may stay unread.
        loaded = dist_checkpointing.load(sharded, str(directory), strict=StrictHandling.RAISE_UNEXPECTED)
    except Exception as err:  # dist_checkpointing raises many types; all mean the same to the user
        raise CheckpointError(
            f"cannot load checkpoint {directory}: {err}\nthe checkpoint is corrupt or does not match this model;"
            " nothing was loaded"
        ) from err

    for i, chunk in enumerate(model_chunks):
        unwrapped(chunk).load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        with torch.no_grad():  # main parameters are views of leaf tensors under the distributed optimizer
            optimizer.load_state_dict(loaded["optimizer"])
    if restore_rng:
        _set_rng_state(loaded[RNG_KEY])


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
            state = "missing" if actual is None else f"truncated ({actual} of {size} bytes)"
            raise CheckpointError(
                f"checkpoint shard {shard} is {state}; the checkpoint is damaged: restore it or point"
                " checkpoint.dir at another one"
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
