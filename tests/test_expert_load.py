"""MoE load in the log: each router's routed tokens counted once per training token, never for validation.

The reference is megatron-core's own count for the expert-bias update (``TopKRouter.local_tokens_per_expert``,
kept under its own condition by its own code); the totals are the closed form tokens x top-k of dropless routing.
That every layout gives one rank's counts is tests/test_layouts.py's part.
"""

import json

import pytest
import torch
from megatron.core.transformer.moe.router import TopKRouter

from mimo.model.builder import build_model
from mimo.model.config import PrecisionConfig
from mimo.parallel.config import ParallelConfig
from mimo.recipes import load_config
from mimo.train.expert_load import ExpertLoad, max_violation

SEQ, BATCH = 32, 2


def test_max_violation_is_max_over_mean_minus_one():
    assert max_violation([[2, 2, 2, 2], [4, 0, 2, 2], [0, 0, 0, 0]]) == [0.0, 1.0, 0.0]


def test_counts_are_megatrons_for_training_forwards_and_nothing_for_no_grad_ones(single_rank):
    model_cfg = load_config().model
    model = build_model(model_cfg, ParallelConfig(), PrecisionConfig(), seq_length=SEQ, seed=0)[0]
    load = ExpertLoad([model], model_cfg, torch.device("cpu"))
    routers = [module for module in model.modules() if isinstance(module, TopKRouter)]
    tokens = torch.randint(0, model_cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    model.eval()  # the loss trackers (process-wide) stay untouched; routing and its counts do not depend on it
    with torch.no_grad():
        model(tokens, None, None)  # as validation runs: not counted
    assert not load.counts.any()
    model(tokens, None, None)  # gradients enabled, as in a training forward
    megatron = torch.stack([router.local_tokens_per_expert for router in routers]).double()
    assert torch.equal(load.counts, megatron)
    for router, bias in zip(routers, ([0.5, -1.0], [2.0, 0.0], [-3.0, 1.0])):
        router.expert_bias.copy_(torch.tensor(bias).repeat(model_cfg.num_experts // 2))
    logged = json.loads(json.dumps(load.take()))
    counts = logged["moe_tokens_per_expert"]
    assert [sum(layer) for layer in counts] == [BATCH * SEQ * model_cfg.moe_router_topk] * model_cfg.num_moe_layers
    assert logged["moe_max_violation_per_layer"] == pytest.approx(max_violation(counts))
    assert logged["moe_max_violation"] == max(logged["moe_max_violation_per_layer"])
    assert logged["moe_expert_bias_mean"] == pytest.approx([-0.25, 1.0, -1.0])
    assert logged["moe_expert_bias_max_abs"] == pytest.approx([1.0, 2.0, 3.0])
    assert not load.counts.any(), "take starts a new interval"
