"""Every parallel layout trains the tiny MiMo (MTP on, FP32) exactly as one rank does.

The same seed and global batch (8 sequences, micro-batches of 2) run for 2 steps on one rank and under TP2 with
sequence parallelism, PP2 (1F1B), PP2 x VPP2 (interleaved), EP2 with the alltoall and with the allgather token
dispatcher, DP2 with the distributed optimizer, CP2, and on 4 ranks TP2 x EP2, PP2 x DP2, EP2 x DP2, TP2 x PP2,
CP2 x TP2 x EP2 and CP4. The tiny model's sequences are 128 tokens and its window 16, so under CP2 each rank's
second chunk needs keys of the other rank's chunk, and under CP4 (chunks of 16) every window reaches across a
chunk boundary; the MTP loss rolls labels across chunks. (Context parallelism with the loss masked after
end-of-document tokens, whose chunks count different numbers of tokens, is compared with one rank in
tests/test_context_parallel_layouts.py and tests/test_document_layouts.py.)
For each, the logged loss, LM, MTP and aux losses and the gradient norm of both steps, the validation after step 2
(loss, perplexity, MTP loss and acceptance), the tokens routed to each expert of each MoE layer (exactly), the
initial weights (step 1 trains at learning rate 0: warm-up starts there, so its checkpoint holds them), and every
tensor of the step-2 checkpoint (weights after a real update, expert biases, Adam moments) are compared with the
single rank. Training
on after a real update, and doing so under another layout, is tests/test_resharding.py's part.

Tolerance: 1e-5 relative, per metric and step, and per tensor in norm. All runs compute in FP32 (unit roundoff
6e-8); a layout changes only the order of floating-point sums (tensor-parallel partial matmuls, gradient
reductions over other groups, the pipeline's micro-batch order), which moves each result by a few ulps. Measured:
metrics within 1.2e-7, tensors within 1.5e-6 (the embedding's Adam update divides tiny, rounding-dominated
gradients of rare tokens by their own square root). Every layout bug found while writing these tests moved
something by 3e-5 or more (an inaccurate gradient norm) up to order 1 (experts missing half their gradient,
interleaved activations swapped with gradients), so 1e-5 separates rounding from error with margin both ways.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from mimo.model.config import ModelConfig
from mimo.parallel.backend_limits import check_backend_support
from mimo.parallel.config import ParallelConfig
from mimo.parallel.layout import LayoutError, validate_layout
from mimo.recipes import load_config

from layout_runs import Run, run_group, run_single, tensor_differences, worst_metric_difference

TOLERANCE = 1e-5
RUN = ("train.steps=2", "checkpoint.interval=1", "checkpoint.keep=2", "eval.interval=2", "eval.iters=1")
"""Two steps, a checkpoint after each, validation after the second (on one global batch)."""
VALIDATION = ("val_loss", "val_ppl", "val_mtp_loss")

TWO_RANKS = {
    "tp2-sp": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2"],
    "pp2-vpp2": ["parallel.pp=2", "parallel.vpp=2"],
    "ep2-alltoall": ["parallel.ep=2", "model.moe_token_dispatcher=alltoall"],
    "ep2-allgather": ["parallel.ep=2", "model.moe_token_dispatcher=allgather"],
    "dp2-distributed-optimizer": ["parallel.distributed_optimizer=true"],
    "cp2": ["parallel.cp=2"],
}
FOUR_RANKS = {
    "tp2-ep2": ["parallel.tp=2", "parallel.ep=2"],
    "pp2-dp2": ["parallel.pp=2"],
    "ep2-dp2": ["parallel.ep=2"],
    "tp2-pp2": ["parallel.tp=2", "parallel.pp=2"],
    "cp2-tp2-ep2": ["parallel.cp=2", "parallel.tp=2", "parallel.ep=2"],
    "cp4": ["parallel.cp=4"],
}


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_cache) -> Run:
    return run_single(Run(tmp_path_factory.mktemp("single"), RUN), data_cache)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, data_cache, single) -> dict:
    runs = {}
    for nproc, group in ((2, TWO_RANKS), (4, FOUR_RANKS)):
        named = {name: Run(tmp_path_factory.mktemp(name), [*overrides, *RUN]) for name, overrides in group.items()}
        run_group(nproc, list(named.values()), data_cache)
        runs.update(named)
    return runs


@pytest.mark.system
@pytest.mark.parametrize("name", [*TWO_RANKS, *FOUR_RANKS])
def test_losses_and_grad_norms_match_one_rank(name, layouts, single):
    reference = single.metrics()
    assert [r["step"] for r in reference] == [1, 2]
    worst = worst_metric_difference(reference, layouts[name].metrics())
    assert set(worst) == {"loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm"}
    assert max(worst.values()) <= TOLERANCE, worst


@pytest.mark.system
@pytest.mark.parametrize("name", [*TWO_RANKS, *FOUR_RANKS])
def test_initial_and_trained_tensors_match_one_rank(name, layouts, single):
    first, second = single.metrics()
    assert first["lr"] == 0.0 < second["lr"], "step 1 must keep the initial weights and step 2 train"
    model = {key: value for key, value in single.checkpoint(1).items() if not key.startswith("chained_")}
    initial = tensor_differences(model, {key: layouts[name].checkpoint(1)[key] for key in model})
    assert max(initial.values()) <= TOLERANCE, sorted(initial.items(), key=lambda item: -item[1])[:5]
    trained = tensor_differences(single.checkpoint(2), layouts[name].checkpoint(2))
    assert max(trained.values()) <= TOLERANCE, sorted(trained.items(), key=lambda item: -item[1])[:5]


@pytest.mark.system
@pytest.mark.parametrize("name", [*TWO_RANKS, *FOUR_RANKS])
def test_validation_matches_one_rank(name, layouts, single):
    (reference,) = [row for row in single.metrics() if "val_loss" in row]
    (validated,) = [row for row in layouts[name].metrics() if "val_loss" in row]
    assert reference["step"] == validated["step"] == 2
    for key in VALIDATION:
        assert validated[key] == pytest.approx(reference[key], rel=TOLERANCE), key
    assert validated["val_mtp_acceptance"] == reference["val_mtp_acceptance"], "a greedy choice flipped"


@pytest.mark.system
@pytest.mark.parametrize("name", [*TWO_RANKS, *FOUR_RANKS])
def test_expert_load_matches_one_rank(name, layouts, single):
    """Every token routed once per MoE layer, whichever rank routes it: the same counts as one rank, dropless
    totals of the step's tokens x top-k, and MaxVio recomputed from the counts."""
    recipe = load_config()
    top_k, seq_length = recipe.model.moe_router_topk, recipe.train.seq_length
    for reference, row in zip(single.metrics(), layouts[name].metrics()):
        counts = row["moe_tokens_per_expert"]
        assert counts == reference["moe_tokens_per_expert"], f"step {row['step']}"
        assert {sum(layer) for layer in counts} == {row["global_batch_size"] * seq_length * top_k}
        violations = [max(layer) / (sum(layer) / len(layer)) - 1 for layer in counts]
        assert row["moe_max_violation_per_layer"] == pytest.approx(violations, rel=1e-12)
        assert row["moe_max_violation"] == pytest.approx(max(violations), rel=1e-12)
        assert row["moe_expert_bias_max_abs"] == pytest.approx(reference["moe_expert_bias_max_abs"], rel=TOLERANCE)


def _cli(tmp_path: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    launcher = (
        ["-m", "mimo.train"]
        if nproc == 1
        else ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone", "-m", "mimo.train"]
    )
    command = [sys.executable, *launcher, f"run.dir={tmp_path}", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.system
@pytest.mark.parametrize(
    "nproc, overrides, expected",
    [
        (1, ["parallel.tp=3"], "world size 1 is not divisible by tp * pp * cp = 3 * 1 * 1 = 3"),
        (1, ["parallel.ep=2", "model.num_experts=7"], "parallel.ep=2 does not divide model.num_experts=7"),
        (2, ["parallel.tp=2", "parallel.pp=2"], "world size 2 is not divisible by tp * pp * cp = 2 * 2 * 1 = 4"),
    ],
    ids=["tp3-one-rank", "ep-vs-experts", "torchrun-tp2-pp2-on-2"],
)
def test_cli_refuses_an_invalid_layout_before_building_anything(tmp_path, nproc, overrides, expected):
    done = _cli(tmp_path, nproc, *overrides)
    assert done.returncode != 0
    assert expected in done.stderr
    assert not (tmp_path / "config.yaml").exists(), "the run started before the layout was checked"


def _resolved(world: int, **parallel):
    return validate_layout(
        ParallelConfig(**parallel), ModelConfig(), world, global_batch_size=8, micro_batch_size=2, seq_length=128
    )


def test_backend_limits_refuse_what_gloo_and_torch_adam_cannot_run():
    with pytest.raises(LayoutError, match=r"parallel.etp=2 with parallel.ep=2.*gloo"):
        check_backend_support(_resolved(4, ep=2, etp=2), ModelConfig(), backend="gloo", fused_adam=False)
    check_backend_support(_resolved(4, ep=2, etp=2), ModelConfig(), backend="nccl", fused_adam=True)
    dense_first = _resolved(2, pp=2, pipeline_first_stage_layers=1, pipeline_last_stage_layers=3)
    with pytest.raises(LayoutError, match=r"stage 0 holds only dense layers \[0\].*at least 2 layers"):
        check_backend_support(dense_first, ModelConfig(), backend="gloo", fused_adam=False)
    check_backend_support(dense_first, ModelConfig(), backend="nccl", fused_adam=True)
    with pytest.raises(LayoutError, match=r"moe_token_dispatcher=flex.*GPUs only"):
        check_backend_support(
            _resolved(2, ep=2), ModelConfig(moe_token_dispatcher="flex"), backend="gloo", fused_adam=False
        )
    for parallel in (
        dict(pp=2),
        dict(pp=2, vpp=2),
        dict(pp=2, pipeline_first_stage_layers=3, pipeline_last_stage_layers=1),
    ):
        check_backend_support(_resolved(2, **parallel), ModelConfig(), backend="gloo", fused_adam=False)
