"""Initial weights that depend on the seed and on nothing else: not on the parallel layout, not on the device.

megatron-core draws weights from one running random stream per process, in construction order. Its CPU
initialisation does draw each tensor-parallel weight whole and keep the rank's slice, so tensor parallelism alone
starts from the single-rank weights; but a pipeline stage starts its stream elsewhere (at another seed, in another
layer), and an expert-parallel rank builds only its own experts, so every weight after its first expert comes
from another point of the stream. A run would then start from other weights on every layout, and no two layouts
could be compared or be expected to train alike.

Here every randomly initialised tensor is redrawn, after megatron built the model, from its own generator seeded
by the run seed and the tensor's name in the checkpoint: the global name megatron-core gives it for resharding
(layer numbers counted over all pipeline stages, experts by their global index). The whole global tensor is drawn
with the model's init method in FP32, as megatron's CPU initialisation does, on the parameter's device (a GPU
draws its own stream: the same on every GPU layout, not the CPU's numbers), and this rank keeps the slice the
checkpoint metadata assigns to it. The initial model is therefore the one a checkpoint of it would hold,
whatever layout loads it.
"""

import hashlib
from collections.abc import Iterator, Sequence

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer.module import MegatronModule

from mimo.model.attention import MimoAttention

SEED_BYTES = 8
"""Bytes of the hash that seed each tensor's generator (a 64-bit seed, as torch.Generator takes)."""


def initialize_weights(chunks: Sequence[MegatronModule], seed: int) -> None:
    """Redraw every random weight of this rank's model chunks from (seed, checkpoint name), keeping this rank's
    slice; norm scales (ones) and the router's expert bias (zeros, a buffer) keep their constructed values.

    MiMo has no linear biases, so the random tensors are exactly the matrices (every parameter of two or more
    dimensions) and the attention sinks. All of them use the config's init method: MiMo initialises every weight
    with the same normal distribution, output projections included.
    """
    for chunk in chunks:
        config = chunk.config
        if config.init_method is not config.output_layer_init_method:
            raise ValueError(
                "initialize_weights draws every weight with config.init_method, but the TransformerConfig has a"
                " different output_layer_init_method; build the config with mimo.model.builder.transformer_config"
            )
        random_params = _random_parameters(chunk)
        initialized: set[int] = set()
        for shard, param in _parameter_shards(chunk, random_params):
            _draw_shard(shard, seed, config.init_method)
            initialized.add(id(param))
        missing = [name for name, param in chunk.named_parameters() if id(param) in random_params - initialized]
        if missing:
            raise RuntimeError(
                f"no checkpoint entry describes the random parameters {missing}, so their initial values could"
                " not be made layout-independent; give their modules a sharded_state_dict"
            )


def _random_parameters(chunk: torch.nn.Module) -> set[int]:
    """ids of the parameters drawn at random: matrices and attention sinks."""
    chosen = {id(param) for param in chunk.parameters() if param.dim() >= 2}
    for module in chunk.modules():
        if isinstance(module, MimoAttention) and module.geometry.sink:
            chosen.add(id(module.core_attention.softmax_offset))
    return chosen


def _parameter_shards(chunk: MegatronModule, params: set[int]) -> Iterator[tuple]:
    """(sharded tensor whose data is this rank's piece of a parameter, that parameter) for the given params.

    A factory (the gated FFN's [gate; up] weight) splits its parameter into views with their own global offsets.
    """
    # An empty metadata dict is filled in with the data-parallel group that the MTP block's copy of the embedding
    # needs on a last pipeline stage (as the checkpoint code does).
    for entry in nested_values(chunk.sharded_state_dict(metadata={})):
        if not isinstance(entry, (ShardedTensor, ShardedTensorFactory)) or id(entry.data) not in params:
            continue
        pieces = [entry] if isinstance(entry, ShardedTensor) else _built(entry)
        for piece in pieces:
            yield piece, entry.data


def _built(factory: ShardedTensorFactory) -> list[ShardedTensor]:
    built = factory.build()
    pieces = nested_values(built) if isinstance(built, (dict, list)) else [built]
    return [piece for piece in pieces if isinstance(piece, ShardedTensor)]


def _draw_shard(shard: ShardedTensor, seed: int, init_method) -> None:
    if shard.flattened_range is not None:
        raise ValueError(f"{shard.key}: flattened model shards are not expected in a model's sharded state dict")
    prepended = shard.prepend_axis_num
    # Axes megatron prepends (the global expert index) select separate tensors, each drawn on its own.
    name = f"{shard.key}@{tuple(shard.global_offset[:prepended])}"
    device = shard.data.device
    generator = torch.Generator(device=device).manual_seed(tensor_seed(seed, name))
    full = torch.empty(shard.global_shape[prepended:], dtype=torch.float32, device=device)
    init_method(full, generator=generator)
    index = tuple(
        slice(offset, offset + size) for offset, size in zip(shard.global_offset[prepended:], shard.data.shape)
    )
    with torch.no_grad():
        shard.data.copy_(full[index])


def tensor_seed(seed: int, name: str) -> int:
    """A 64-bit seed for one named tensor of a run; a hash, so names that differ little still draw unrelated
    streams and the value is the same in every process and Python version."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:SEED_BYTES], "little")
