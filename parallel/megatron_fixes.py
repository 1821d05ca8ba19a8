"""Corrections to megatron-core bugs that change what a run computes or saves, on every device.

Each fix names the megatron-core versions it was verified against; on any other version it is left out with a
warning (the internals it touches may have moved, or the bug may be fixed upstream), never applied blindly.
``mimo.parallel.runtime.initialize`` applies them once per process, before any model or optimizer exists.
"""

import logging

from mimo.parallel.cpu_compat import megatron_version

logger = logging.getLogger(__name__)

FULLY_RESHARDABLE_OFFSETS_VERIFIED: tuple[str, ...] = ("0.16.1",)

_applied = False


def apply_megatron_fixes() -> None:
    """Apply every fix verified for the installed megatron-core. Safe to call repeatedly."""
    global _applied
    if _applied:
        return
    version = megatron_version()
    if version in FULLY_RESHARDABLE_OFFSETS_VERIFIED:
        _fix_fully_reshardable_offsets()
    else:
        logger.warning(
            "megatron-core %s: mimo's fix for the distributed optimizer's fully_reshardable checkpoint offsets"
            " was verified on %s only and is not applied; check that the optimizer state of parameters in a"
            " second gradient bucket (the embedding under pipeline parallelism) survives a save and load",
            version,
            ", ".join(FULLY_RESHARDABLE_OFFSETS_VERIFIED),
        )
    _applied = True


def _fix_fully_reshardable_offsets() -> None:
    """Save each parameter's own optimizer state in the fully_reshardable checkpoint format.

    ``sharded_param_state_fully_reshardable`` cuts every parameter's state out of buffer-wide tensors that
    ``get_parameter_state_dp_zero`` assembles without the padding between gradient buckets, but at the
    parameter's position in the padded buffer. With one bucket the two agree. A buffer gets a second bucket
    when the embedding is shared across pipeline stages (pipeline parallelism with MTP or tied embeddings)
    under the distributed optimizer; the state saved for the embedding is then shifted by the padding before
    its bucket and ends in zeros, and a resume loads that into the optimizer and, for FP32 parameters, into the
    weights themselves. The positions are translated into the unpadded layout while the state dict is built.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    build = DistributedOptimizer.sharded_param_state_fully_reshardable

    def build_with_unpadded_positions(self: DistributedOptimizer, *args, **kwargs):
        padded = [buffer.param_index_map for buffer in self.buffers]
        try:
            for buffer in self.buffers:
                buffer.param_index_map = _unpadded_index_map(buffer)
            return build(self, *args, **kwargs)
        finally:
            for buffer, index_map in zip(self.buffers, padded):
                buffer.param_index_map = index_map

    DistributedOptimizer.sharded_param_state_fully_reshardable = build_with_unpadded_positions


def _unpadded_index_map(buffer) -> dict:
    """``param_index_map`` (param -> (start, end, bucket id), padded buffer positions) in the coordinates of the
    buffer with every bucket's end padding removed, in the same order."""
    shift = {}
    unpadded_start = 0
    for bucket_id, bucket in enumerate(buffer.buckets):
        shift[bucket_id] = bucket.offset - unpadded_start
        unpadded_start += bucket.numel_unpadded
    return {
        param: (start - shift[bucket_id], end - shift[bucket_id], bucket_id)
        for param, (start, end, bucket_id) in buffer.param_index_map.items()
    }
