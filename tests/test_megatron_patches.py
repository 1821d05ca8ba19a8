"""mimo's megatron-core patches and the runtime, exercised through real megatron-core code on 2 gloo ranks.

References are closed forms computed from all ranks' inputs (which expert must receive which token, what the
combined output must be) and cross-rank comparisons (which RNG streams must agree and which must differ).
"""

import gc
import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.random import (
    _MODEL_PARALLEL_RNG_TRACKER_NAME,
    get_expert_parallel_rng_tracker_name,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe import token_dispatcher
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from mimo.model.config import ModelConfig
from mimo.parallel import runtime
from mimo.parallel.config import ParallelConfig
from mimo.parallel.layout import LayoutError
from mimo.parallel.megatron_patches import apply_megatron_patches

from multirank import join_rendezvous, spawn_ranks

WORLD_SIZE = 2
SEED = 1234
NUM_EXPERTS = 4
TOPK = 2
TOKENS_PER_RANK = 6
HIDDEN = 8
SAMPLE = 16


def _initialize(parallel: ParallelConfig) -> runtime.Runtime:
    return runtime.initialize(parallel, ModelConfig(), seed=SEED, global_batch_size=4, micro_batch_size=1, seq_length=8)


def _gather(tensor: torch.Tensor) -> list:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return parts


def _routing(rank: int):
    """Inputs and a top-k routing map that differ per rank (each token picks TOPK distinct experts)."""
    generator = torch.Generator().manual_seed(SEED + rank)
    hidden = torch.randn(TOKENS_PER_RANK, HIDDEN, generator=generator)
    scores = torch.rand(TOKENS_PER_RANK, NUM_EXPERTS, generator=generator)
    routing_map = torch.zeros(TOKENS_PER_RANK, NUM_EXPERTS, dtype=torch.bool)
    routing_map.scatter_(1, scores.topk(TOPK, dim=1).indices, True)
    return hidden, routing_map


def _check_dispatcher(dispatcher_type: str, ep_rank: int) -> None:
    """Dispatch tokens to experts, scale each expert's tokens by (expert id + 1), combine, compare."""
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=1,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=TOPK,
        expert_model_parallel_size=WORLD_SIZE,
        moe_token_dispatcher_type=dispatcher_type,
        use_cpu_initialization=True,
    )
    dispatcher_class = {
        "alltoall": token_dispatcher.MoEAlltoAllTokenDispatcher,
        "allgather": token_dispatcher.MoEAllGatherTokenDispatcher,
    }[dispatcher_type]
    num_local = NUM_EXPERTS // WORLD_SIZE
    local_experts = [ep_rank * num_local + i for i in range(num_local)]
    dispatcher = dispatcher_class(num_local, local_experts, config, pg_collection=get_default_pg_collection())

    hidden, routing_map = _routing(dist.get_rank())
    probs = routing_map.float() / TOPK
    tokens, token_probs = dispatcher.dispatch_preprocess(hidden, routing_map, probs)
    tokens, token_probs = dispatcher.token_dispatch(tokens, token_probs)
    tokens, tokens_per_expert, _ = dispatcher.dispatch_postprocess(tokens, token_probs)

    all_hidden, all_maps = _gather(hidden), _gather(routing_map)
    expected_chunks = [torch.cat([h[m[:, expert]] for h, m in zip(all_hidden, all_maps)]) for expert in local_experts]
    assert [int(n) for n in tokens_per_expert] == [len(chunk) for chunk in expected_chunks]
    torch.testing.assert_close(tokens, torch.cat(expected_chunks), rtol=0, atol=0)

    chunks = tokens.split([int(n) for n in tokens_per_expert])
    scaled = torch.cat([chunk * (expert + 1) for chunk, expert in zip(chunks, local_experts)])
    output = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(scaled)))
    expert_scale = routing_map.float() @ torch.arange(1, NUM_EXPERTS + 1, dtype=torch.float32)
    torch.testing.assert_close(output.view_as(hidden), hidden * expert_scale[:, None])


def _check_rng_streams(fork_name: str, stream_differs_across_ranks: bool) -> None:
    """A megatron RNG fork must draw its own (per-rank) stream, be reproducible, and leave the default alone."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.default_generator.get_state()
    plain = torch.rand(SAMPLE)
    torch.default_generator.set_state(before)
    with tracker.fork(fork_name):
        forked = torch.rand(SAMPLE)
    # The fork swaps the generator state in and back out: the default stream continues as if untouched.
    torch.testing.assert_close(torch.rand(SAMPLE), plain, rtol=0, atol=0)

    forked_parts = _gather(forked)
    assert torch.equal(forked_parts[0], forked_parts[1]) != stream_differs_across_ranks
    plain_parts = _gather(plain)
    assert torch.equal(plain_parts[0], plain_parts[1]), "the data-parallel (default) stream must match"

    tensor_parallel.model_parallel_cuda_manual_seed(SEED)  # what initialize() did (pp=1: no stage offset)
    with tensor_parallel.get_cuda_rng_tracker().fork(fork_name):
        torch.testing.assert_close(torch.rand(SAMPLE), forked, rtol=0, atol=0)


def _check_targeted_cuda_stand_ins() -> None:
    """No process-wide redirection: plain torch calls behave as torch's own, and only the megatron functions that
    name CUDA see the stand-ins."""
    from megatron.core.optimizer import clip_grads

    assert not torch.overrides._get_current_function_mode_stack(), "no TorchFunctionMode may stay entered"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")
    assert torch.ones(1).type() == "torch.FloatTensor"
    assert clip_grads.torch.zeros(1, device="cuda").device.type == "cpu"
    assert clip_grads.torch.tensor([1.0], device="cuda").device.type == "cpu"
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 2.0)
    total_norm = 4.0
    clip_grads.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=total_norm)  # asserts the CUDA name
    torch.testing.assert_close(param.grad, torch.full((3,), 2.0 / (total_norm + 1e-6)), rtol=1e-6, atol=0)
    assert torch.ones(1).type() == "torch.FloatTensor", "the CUDA spelling lasts only while megatron's code runs"


def _worker(rank: int, ports: list[int]) -> None:
    torch.set_num_threads(1)  # two ranks share two cores; these tensors are far too small to need threads
    run = _initialize(ParallelConfig(ep=2, timeout_minutes=1))
    assert (run.rank, run.world_size, run.is_main, run.backend) == (rank, WORLD_SIZE, rank == 0, "gloo")
    assert (run.layout.dp, run.layout.expert_dp) == (2, 1)
    assert parallel_state.get_expert_model_parallel_world_size() == 2
    assert apply_megatron_patches(cuda=False, transformer_engine=False, fused_adam=False) == [], "applied once"
    _check_targeted_cuda_stand_ins()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    for dispatcher_type in ("alltoall", "allgather"):
        _check_dispatcher(dispatcher_type, ep_rank)
    _check_rng_streams(get_expert_parallel_rng_tracker_name(), stream_differs_across_ranks=True)
    # Both ranks are tensor-parallel rank 0 here, so the model-parallel stream must agree.
    _check_rng_streams(_MODEL_PARALLEL_RNG_TRACKER_NAME, stream_differs_across_ranks=False)
    runtime.shutdown()

    # Re-initialising in the same process (as tests do) with a different layout.
    join_rendezvous(rank, WORLD_SIZE, ports[1])
    run = _initialize(ParallelConfig(tp=2, timeout_minutes=1))
    assert run.layout.sequence_parallel and run.layout.dp == 1
    _check_rng_streams(_MODEL_PARALLEL_RNG_TRACKER_NAME, stream_differs_across_ranks=True)
    runtime.shutdown()
    assert not dist.is_initialized()


@pytest.mark.system
def test_two_rank_runtime_dispatchers_and_rng():
    assert not dist.is_initialized(), "a previous test left a process group behind; call runtime.shutdown()"
    spawn_ranks(_worker, WORLD_SIZE, rendezvous=2)


def _fresh_process(code: str) -> str:
    """Run ``code`` in a new interpreter (no patch applied yet) and return what it printed."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_an_unverified_megatron_is_refused_before_anything_is_patched():
    printed = _fresh_process(
        "import torch\n"
        "from megatron.core import package_info\n"
        "package_info.__version__ = '0.99.0'\n"
        "from mimo.parallel import megatron_patches as mp\n"
        "current_device = torch.cuda.current_device\n"
        "try:\n"
        "    mp.apply_megatron_patches(cuda=False, transformer_engine=False, fused_adam=False)\n"
        "except mp.UnsupportedMegatronVersion as err:\n"
        "    print(err)\n"
        "assert not mp.applied_patches() and torch.cuda.current_device is current_device\n"
    )
    assert "megatron-core 0.99.0 is installed" in printed and "megatron-core>=0.16.1,<0.17" in printed


@pytest.mark.parametrize(
    "machine, expected",
    [
        ("cuda=True, transformer_engine=True, fused_adam=True", {"fully_reshardable_offsets", "optimizer_state_gc"}),
        (
            "cuda=True, transformer_engine=False, fused_adam=False",
            {
                "fully_reshardable_offsets",
                "optimizer_state_gc",
                "te_general_gemm_name",
                "torch_adam_checkpoint_load",
                "fp64_grad_norm",
            },
        ),
    ],
    ids=["gpu-with-te", "gpu-without-te"],
)
def test_a_gpu_gets_no_cpu_patch_but_the_torch_adam_fixes_where_te_is_missing(machine, expected):
    """The patches of a scope apply exactly where their upstream assumption breaks: the optimizer fixes for torch's
    Adam on every machine without Transformer Engine or Apex, the CUDA stand-ins never where CUDA exists."""
    printed = _fresh_process(
        "import json, torch\n"
        "from mimo.parallel import megatron_patches as mp\n"
        "current_device = torch.cuda.current_device\n"
        f"print(json.dumps(mp.apply_megatron_patches({machine})))\n"
        "assert torch.cuda.current_device is current_device\n"
    )
    assert set(json.loads(printed)) == expected


def test_launch_env_from_torchrun_slurm_or_nothing():
    torchrun = dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="6000")
    assert runtime.launch_env(torchrun, default_port=29500) == runtime.LaunchEnv(3, 8, 1, "10.0.0.1", 6000)
    with pytest.raises(runtime.LaunchError, match="--standalone"):
        runtime.launch_env({**torchrun, "MASTER_PORT": "0"}, default_port=29500)
    with pytest.raises(runtime.LaunchError, match="MASTER_ADDR"):
        runtime.launch_env(dict(RANK="0", WORLD_SIZE="2", MASTER_PORT="6000"), default_port=29500)

    slurm = dict(SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_LOCALID="1")
    slurm["SLURM_JOB_NODELIST"] = "gpu[007-009,012],cpu1"
    assert runtime.launch_env(slurm, default_port=29500) == runtime.LaunchEnv(5, 16, 1, "gpu007", 29500)
    with_ip = {**slurm, "SLURM_LAUNCH_NODE_IPADDR": "10.1.2.3", "MASTER_PORT": "7000"}
    assert runtime.launch_env(with_ip, default_port=29500) == runtime.LaunchEnv(5, 16, 1, "10.1.2.3", 7000)
    assert runtime.launch_env({**with_ip, "MASTER_ADDR": "head"}, default_port=29500).master_addr == "head"

    lone = runtime.launch_env({}, default_port=29500)
    assert (lone.rank, lone.world_size, lone.local_rank, lone.master_port) == (0, 1, 0, None)


@pytest.mark.parametrize(
    "nodelist, host",
    [("node1", "node1"), ("a[1-3]", "a1"), ("rack1-n[02,05]-ib,other", "rack1-n02-ib"), ("x,y[1-2]", "x")],
)
def test_first_slurm_host(nodelist, host):
    assert runtime.first_slurm_host(nodelist) == host


def test_bad_layout_fails_before_any_process_group(monkeypatch):
    for key in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(LayoutError, match="world size 1"):
        _initialize(ParallelConfig(tp=2))
    assert not dist.is_initialized()


def test_the_optimizer_collects_garbage_only_when_automatic_collection_is_off(monkeypatch):
    from megatron.core.optimizer import distrib_optimizer

    from mimo.parallel.megatron_patches.optimizer import _collect_only_with_automatic_gc_off

    monkeypatch.setattr(distrib_optimizer, "gc", distrib_optimizer.gc)  # undone after the test
    _collect_only_with_automatic_gc_off()
    collections = []
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(args) or 0)
    distrib_optimizer.gc.collect()
    assert collections == [], "a full collection with the collector on"
    gc.disable()
    try:
        distrib_optimizer.gc.collect()
    finally:
        gc.enable()
    assert collections == [()], "Megatron-LM's manual-GC mode still frees the state"
