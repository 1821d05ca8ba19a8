"""Sharded checkpoints with megatron-core dist_checkpointing, safe against kills and reshardable across layouts.

``manager`` (where checkpoints go, which one is ``latest``, which are kept), ``storage`` (the tensors: model,
optimizer and RNG state through dist_checkpointing, and the shard-file integrity check) and ``lookup`` (finding a
checkpoint from what a user points at and reading what it says about itself).
"""

from mimo.recipes.errors import MimoError


class CheckpointError(MimoError, RuntimeError):
    """A checkpoint that cannot be used; nothing has been loaded into the model or optimizer."""
