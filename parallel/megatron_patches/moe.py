"""Patches to megatron-core's MoE code (see ``mimo.parallel.megatron_patches``)."""

from typing import Any

import torch

from mimo.parallel.megatron_patches import Patch


def _bind_te_general_gemm() -> None:
    """router_gating_linear tests ``te_general_gemm is not None``, but the name is only bound when Transformer
    Engine imports: moe_router_dtype="fp32" would raise NameError without it."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _split_sizes_to_host() -> None:
    """The alltoall dispatcher turns its split sizes into numpy arrays only when they live on a GPU; gloo's
    all_to_all_single rejects the CPU tensors left otherwise and wants integer sequences."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    move_to_cpu = moe_utils.maybe_move_tensor_to_cpu

    def splits_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor):
            return tensor.numpy()
        return move_to_cpu(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = splits_to_host


PATCHES = (
    Patch(
        "te_general_gemm_name",
        "no_transformer_engine",
        "moe_utils.te_general_gemm is bound (it is only when Transformer Engine imports)",
        _bind_te_general_gemm,
    ),
    Patch(
        "alltoall_split_sizes_on_host",
        "no_cuda",
        "the alltoall dispatcher's split sizes live on a GPU and become numpy arrays on their way to the host",
        _split_sizes_to_host,
    ),
)
