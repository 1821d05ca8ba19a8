"""RMSNorm for the local (non-Transformer-Engine) backend.

megatron-core's local norm (``WrappedTorchNorm``) refuses sequence parallelism, and megatron needs sequence
parallelism whenever tensor parallelism meets MoE. Under sequence parallelism each tensor-parallel rank normalises
its own slice of the sequence, so the weight gradient is only a partial sum: the weight is tagged
``sequence_parallel`` and megatron's gradient finalisation all-reduces such parameters over the TP group.
"""

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """x / rms(x) * weight, computed in FP32 and cast back before the weight multiply (as transformers does)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        self.weight.sequence_parallel = config.sequence_parallel
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        states = hidden_states.float()
        states = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * states.to(input_dtype)
