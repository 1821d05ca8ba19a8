"""MoE load in the log: tokens routed to each expert of every MoE layer, their imbalance, and the expert biases.

Counts come from a forward hook on each router that sums its routing map, under the condition megatron-core
0.16.1 uses for the expert-bias counts (``TopKRouter._apply_expert_bias``): gradients enabled. So training tokens
count once each (with activation recomputation the first forward runs without gradients and the recomputation
counts), and validation, which runs without gradients, never counts. The hook only reads: routing is unchanged.

Every token is routed on exactly one rank per MoE layer: data-parallel (and expert-parallel, carved out of them)
ranks hold different sequences, context-parallel ranks different chunks of them, tensor-parallel ranks different
slices under sequence parallelism (which MoE layers require with tp > 1), and each layer lives on one pipeline
stage. So one sum over all ranks of [MoE layer, expert] counts, zero where a rank lacks the layer, counts every
token once, under every layout.

``max_violation`` is MaxVio of the loss-free balancing literature: max load / mean load - 1 over a layer's experts.
"""

from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import TopKRouter

from mimo.model.config import ModelConfig

TOKENS_PER_EXPERT = "moe_tokens_per_expert"
MAX_VIOLATION = "moe_max_violation"
MAX_VIOLATION_PER_LAYER = "moe_max_violation_per_layer"
BIAS_MEAN = "moe_expert_bias_mean"
BIAS_MAX_ABS = "moe_expert_bias_max_abs"
PER_LAYER = {
    MAX_VIOLATION_PER_LAYER: "max_violation",
    BIAS_MEAN: "expert_bias_mean",
    BIAS_MAX_ABS: "expert_bias_max_abs",
}
"""The per-MoE-layer lists ``take`` logs, and the name of each as a series (wandb: ``moe/<name>/layer_<n>``)."""


def max_violation(counts: Sequence[Sequence[float]]) -> list[float]:
    """Per layer, max load / mean load - 1 (0 for perfect balance; 0 for a layer that saw no tokens)."""
    violations = []
    for layer in counts:
        mean = sum(layer) / len(layer)
        violations.append(max(layer) / mean - 1 if mean > 0 else 0.0)
    return violations


class ExpertLoad:
    """Counts the routing of this rank's MoE layers between two ``take`` calls; ``take`` reduces over all ranks."""

    def __init__(self, chunks: Sequence[torch.nn.Module], model: ModelConfig, device: torch.device) -> None:
        self.moe_layers = model.moe_layers()
        # On the device the routing runs on: counting never waits for it.
        self.counts = torch.zeros(len(self.moe_layers), model.num_experts, dtype=torch.float64, device=device)
        self.routers: dict[int, TopKRouter] = {}
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    self.routers[self._index(module)] = module
                    module.register_forward_hook(self._count)

    def _index(self, router: TopKRouter) -> int:
        """Position among the model's MoE layers (which may lie anywhere); megatron's layer numbers are global and
        start at 1."""
        layer = router.layer_number - 1
        if layer not in self.moe_layers:
            raise RuntimeError(
                f"a router at layer number {router.layer_number} is not in a MoE layer {self.moe_layers}"
            )
        return self.moe_layers.index(layer)

    def _count(self, router: TopKRouter, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        if torch.is_grad_enabled():
            _, routing_map = output
            self.counts[self._index(router)] += routing_map.detach().sum(dim=0)

    def take(self) -> dict[str, list | float]:
        """The interval's counts over all ranks and the expert-bias statistics (nothing for a model without MoE
        layers); starts a new interval."""
        if not len(self.counts):
            return {}
        counts = self.counts.clone()
        dist.all_reduce(counts)
        self.counts.zero_()
        counts = counts.cpu().tolist()
        violations = max_violation(counts)
        bias_mean, bias_max_abs = self._bias_statistics()
        return {
            TOKENS_PER_EXPERT: [[int(n) for n in layer] for layer in counts],
            MAX_VIOLATION: max(violations),
            MAX_VIOLATION_PER_LAYER: violations,
            BIAS_MEAN: bias_mean,
            BIAS_MAX_ABS: bias_max_abs,
        }

    def _bias_statistics(self) -> tuple[list[float], list[float]]:
        """Per MoE layer, mean and max |b| of the expert bias. Every rank holding a layer holds the same bias, so a
        max over ranks, with -inf where a rank lacks the layer, gives each layer's values."""
        stats = torch.full((len(self.counts), 2), -torch.inf, dtype=torch.float64, device=self.counts.device)
        for index, router in self.routers.items():
            bias = router.expert_bias.detach().double()  # mimo's routers always keep one (mimo.model.builder)
            stats[index] = torch.stack([bias.mean(), bias.abs().max()])
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        mean, max_abs = stats.cpu().T.tolist()
        return mean, max_abs
