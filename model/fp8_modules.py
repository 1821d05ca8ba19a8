"""Linear modules that carry out the precision plan's per-GEMM choices.

* Emulated FP8 (local backend): megatron's ColumnParallelLinear / RowParallelLinear with their GEMM replaced by
  ``fp8_emulated_linear``. Everything else (weights, initialisation, checkpoint keys, tensor- and sequence-parallel
  communication) is megatron's, so a run can switch between BF16 and emulated FP8 and keep its checkpoints.
* Transformer Engine: the modules an FP8 run keeps out of FP8 run their forward (and so their backward) with TE's
  FP8 autocast switched off, inside the autocast megatron opens around every layer.
"""

import functools

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from mimo.model.config import ModelConfigError
from mimo.model.fp8_emulation import fp8_emulated_linear
from mimo.model.precision import Fp8Scaling


class _Fp8EmulatedGemm:
    """Replaces megatron's ``_forward_impl`` (the GEMM with its tensor-parallel communication).

    megatron's fused function all-gathers the sequence-parallel input and reduce-scatters its gradient, or
    all-reduces the input gradient, around its own GEMM. Here the same communication comes from megatron's
    autograd mappings and the GEMM from the emulation: forward all-gather / backward reduce-scatter under sequence
    parallelism, forward identity / backward all-reduce when the input gradient needs reducing.
    """

    fp8: Fp8Scaling

    def _check_emulation_support(self) -> None:
        if self.config.gradient_accumulation_fusion:
            raise ModelConfigError(
                "emulated FP8 linears compute their weight gradients themselves; set gradient_accumulation_fusion"
                " off (mimo never sets it) or use Transformer Engine's FP8"
            )

    def _forward_impl(
        self,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        allreduce_dgrad: bool,
        sequence_parallel: bool,
        tp_group: torch.distributed.ProcessGroup | None = None,
        **unused,
    ) -> torch.Tensor:
        """megatron's keyword arguments; ``unused`` are gradient-accumulation fusion (refused at construction) and
        the deferred embedding-gradient buffers (the output layer's only, which never runs in FP8)."""
        if sequence_parallel:
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
        elif allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        output = fp8_emulated_linear(input, weight, self.fp8)
        return output if bias is None else output + bias


class Fp8EmulatedColumnParallelLinear(_Fp8EmulatedGemm, ColumnParallelLinear):
    def __init__(self, *args, fp8: Fp8Scaling, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fp8 = fp8
        self._check_emulation_support()


class Fp8EmulatedRowParallelLinear(_Fp8EmulatedGemm, RowParallelLinear):
    def __init__(self, *args, fp8: Fp8Scaling, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fp8 = fp8
        self._check_emulation_support()


@functools.cache
def outside_fp8_autocast(module: type) -> type:
    """A subclass of the Transformer Engine module ``module`` that never runs in FP8 (``fp8_disabled``).

    megatron opens TE's FP8 autocast around whole layers; TE decides at each module's forward whether it runs in
    FP8 (its backward follows the forward's choice), so a nested autocast with FP8 off keeps this one module in
    BF16 while the rest of the layer stays in FP8. One class per base, created once.
    """

    def forward(self, *args, **kwargs):
        from transformer_engine.pytorch.fp8 import fp8_autocast  # the import megatron-core 0.16.1 uses

        with fp8_autocast(enabled=False):
            return module.forward(self, *args, **kwargs)

    return type(f"{module.__name__}OutsideFp8", (module,), {"forward": forward, "fp8_disabled": True})
