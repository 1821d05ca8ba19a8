"""Patches to megatron-core's optimizer and its checkpoint format (see ``mimo.parallel.megatron_patches``)."""

import gc
from typing import Any

import torch

from mimo.parallel.megatron_patches import Patch


def _patch_torch_adam_checkpoint_load() -> None:
    """Make the distributed optimizer's checkpoint load correct with torch's Adam (no TE/Apex FusedAdam).

    Two slips in megatron-core's load path only show with torch's Adam, whose state holds a per-parameter
    ``step``: the reshardable loaders copy every state key from the checkpoint but skip ``step`` on purpose,
    raising KeyError; and the one ``step`` tensor restored from the param groups is shared by every parameter,
    so each Adam update increments it once per parameter and the bias correction runs away after a resume.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    set_states = DistributedOptimizer._set_main_param_and_optimizer_states
    load_state_dict = DistributedOptimizer.load_state_dict

    def set_states_except_step(self: DistributedOptimizer, model_param: torch.Tensor, tensors: dict) -> None:
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            set_states(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    def load_with_own_steps(self: DistributedOptimizer, state_dict: dict) -> None:
        load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states_except_step
    DistributedOptimizer.load_state_dict = load_with_own_steps


def _accurate_l2_norm(chunk_size: int, noop_flag: Any, tensor_lists: list[list[torch.Tensor]], per_tensor: bool, *args):
    """megatron's fallback ``local_multi_tensor_l2_norm`` (no TE/Apex), with per-tensor norms accumulated in FP64.

    The fallback calls ``torch.norm``, whose CPU kernel accumulates a long FP32 vector with an error growing with
    its length (about 4e-6 relative at 2**19 elements, 1e-4 at 2**22), and the distributed optimizer hands it
    gradient shards whose lengths depend on the parallel layout: the reported gradient norm, and the clipping
    factor derived from it, would then change with the layout by far more than rounding.
    """
    norms = [torch.linalg.vector_norm(tensor, dtype=torch.float64) for tensors in tensor_lists for tensor in tensors]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), dtype=torch.float64)
    return total.to(torch.float32).reshape(1), None


def _patch_grad_norm() -> None:
    """Route gradient-norm computation (clipping and logging) through ``_accurate_l2_norm``."""
    from megatron.core.optimizer import clip_grads

    clip_grads.l2_norm_impl = _accurate_l2_norm


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


class _CollectOnlyWithAutomaticGcOff:
    """Stands for the ``gc`` module inside megatron's distributed optimizer: ``collect()`` runs only while automatic
    garbage collection is off. megatron-core collects after building each checkpoint's optimizer state so that a
    training loop which disables the collector (Megatron-LM's manual-GC mode) frees it; with the collector on, as in
    mimo, the full collection only stalls every save (0.3 s or more per call, two calls per save)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(gc, name)

    @staticmethod
    def collect(*args: Any) -> int:
        return 0 if gc.isenabled() else gc.collect(*args)


def _collect_only_with_automatic_gc_off() -> None:
    from megatron.core.optimizer import distrib_optimizer

    distrib_optimizer.gc = _CollectOnlyWithAutomaticGcOff()


PATCHES = (
    Patch(
        "torch_adam_checkpoint_load",
        "no_fused_adam",
        "every Adam state key is a tensor the reshardable loaders copy, and each parameter has its own step",
        _patch_torch_adam_checkpoint_load,
    ),
    Patch(
        "fp64_grad_norm",
        "no_fused_adam",
        "torch.norm's FP32 accumulation is accurate enough for the gradient norm of any shard length",
        _patch_grad_norm,
    ),
    Patch(
        "fully_reshardable_offsets",
        "always",
        "a parameter's position in the padded grad buffer is its position in the unpadded state tensors",
        _fix_fully_reshardable_offsets,
    ),
    Patch(
        "optimizer_state_gc",
        "always",
        "a full garbage collection after building the optimizer's checkpoint state is needed (it is only with the"
        " automatic collector off)",
        _collect_only_with_automatic_gc_off,
    ),
)
