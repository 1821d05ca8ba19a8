"""Finding a checkpoint from what a user points at, and reading what it says about itself without loading it."""

from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader

from mimo.model.config import ModelConfig
from mimo.train.checkpoint import CheckpointError
from mimo.train.checkpoint.manager import META_FILE, latest_checkpoint, read_meta
from mimo.train.config import CHECKPOINTS_SUBDIR, RUN_CONFIG_FILE

EMBEDDING_KEY_SUFFIX = "embedding.word_embeddings.weight"
TORCH_TO_PRECISION = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory (``step_N``), a checkpoints directory (its latest) or a run directory (the latest of
    its ``checkpoints/``)."""
    path = Path(path)
    if (path / META_FILE).exists():
        return path
    for candidate in (path, path / CHECKPOINTS_SUBDIR):
        found = latest_checkpoint(str(candidate))
        if found is not None:
            return found
    raise CheckpointError(
        f"{path} holds no mimo checkpoint; give a run directory, its checkpoints/ directory or one step_N directory"
    )


def run_config_file(checkpoint: Path) -> Path | None:
    """The resolved recipe of the run that wrote ``checkpoint`` (``<run.dir>/config.yaml``), when it is there."""
    for directory in (checkpoint.parent.parent, checkpoint.parent):
        if (directory / RUN_CONFIG_FILE).exists():
            return directory / RUN_CONFIG_FILE
    return None


def checkpoint_model(checkpoint: Path) -> ModelConfig:
    """The model the checkpoint was written for, from its metadata."""
    saved = read_meta(checkpoint).model
    if not saved:
        raise CheckpointError(f"{checkpoint / META_FILE} has no 'model' entry; it was not written by mimo")
    return ModelConfig(**saved).validate()


def checkpoint_precision(checkpoint: Path) -> str:
    """fp32 or bf16: the dtype the model's weights were saved in (read from the shard index, not the shards)."""
    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    for key, entry in metadata.items():
        if key.endswith(EMBEDDING_KEY_SUFFIX) and hasattr(entry, "properties"):
            dtype = str(entry.properties.dtype)
            if dtype in TORCH_TO_PRECISION:
                return TORCH_TO_PRECISION[dtype]
            raise CheckpointError(f"{checkpoint}: weights saved as {dtype}; mimo reads fp32 and bf16 checkpoints")
    raise CheckpointError(f"{checkpoint}: no {EMBEDDING_KEY_SUFFIX} in the shard index; is it a mimo checkpoint?")
