"""Brings up torch.distributed and megatron-core's process groups for one run, the same way on a GPU cluster
(torchrun or Slurm, nccl) as on a laptop (a lone process or torchrun, gloo on CPU)."""

import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from mimo.model.config import ModelConfig
from mimo.parallel.backend_limits import check_backend_support
from mimo.parallel.config import ParallelConfig
from mimo.parallel.layout import ResolvedLayout, validate_layout
from mimo.parallel.megatron_patches import apply_megatron_patches
from mimo.recipes.errors import MimoError

LOOPBACK = "127.0.0.1"

PIPELINE_SEED_STRIDE = 10_000
"""Seed offset between pipeline stages, so stages draw different streams while initialising their layers (one
seed everywhere would give layer i and layer i + layers_per_stage identical weights). It exceeds megatron's own
per-rank offsets (2718 + tp rank, 1024 + 100 * ep rank + etp rank, for ep < 89) so no two streams coincide."""


class LaunchError(MimoError, RuntimeError):
    """The launcher environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int | None
    """The rendezvous port; None for a process started alone (it needs no rendezvous)."""


@dataclass
class Runtime:
    """This process's place in an initialised run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    layout: ResolvedLayout
    is_main: bool
    """Global rank 0: the one process that logs and writes run-level files."""
    backend: str


def initialize(
    parallel: ParallelConfig,
    model: ModelConfig,
    *,
    seed: int,
    global_batch_size: int,
    micro_batch_size: int,
    seq_length: int,
) -> Runtime:
    """Validate the layout, start the process group and megatron's parallel state, and seed every RNG.

    A previous megatron parallel state in this process is torn down first, so tests can initialise repeatedly;
    an existing torch.distributed process group of the right size is reused.
    """
    from megatron.core import parallel_state, tensor_parallel

    launch = launch_env(os.environ, default_port=parallel.master_port)
    # Before any process group exists: a bad layout should fail in seconds, on every rank, with our message.
    layout = validate_layout(
        parallel,
        model,
        launch.world_size,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        seq_length=seq_length,
    )
    has_cuda = torch.cuda.is_available()
    backend = parallel.backend or ("nccl" if has_cuda else "gloo")
    from megatron.core.extensions.transformer_engine import HAVE_TE
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    apply_megatron_patches(cuda=has_cuda, transformer_engine=HAVE_TE, fused_adam=HAVE_APEX_OR_TE)
    if has_cuda:
        torch.cuda.set_device(launch.local_rank)
        device = torch.device("cuda", launch.local_rank)
    else:
        device = torch.device("cpu")
    check_backend_support(layout, model, backend=backend, fused_adam=HAVE_APEX_OR_TE)

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    timeout = timedelta(minutes=parallel.timeout_minutes)
    if dist.is_initialized():
        if dist.get_world_size() != launch.world_size:
            raise LaunchError(
                f"a process group of {dist.get_world_size()} ranks already exists but the launcher says"
                f" {launch.world_size}; call mimo.parallel.runtime.shutdown() before initialising again"
            )
    elif launch.master_port is None:
        # A process started alone needs no rendezvous: an in-process store, no port to find or hold.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{_url_host(launch.master_addr)}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        distributed_timeout_minutes=parallel.timeout_minutes,
    )

    stage_seed = seed + PIPELINE_SEED_STRIDE * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    # Adds megatron's tensor- and expert-parallel RNG streams (different per TP/EP rank, shared across DP).
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)

    return Runtime(
        rank=launch.rank,
        world_size=launch.world_size,
        local_rank=launch.local_rank,
        device=device,
        layout=layout,
        is_main=launch.rank == 0,
        backend=dist.get_backend(),
    )


def shutdown() -> None:
    """Tear down megatron's parallel state and the process group; a no-op when nothing is up."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def launch_env(env: Mapping[str, str], *, default_port: int) -> LaunchEnv:
    """Read torchrun's or Slurm's variables; with neither, describe a process started alone."""
    if "RANK" in env:
        return _from_torchrun(env)
    if "SLURM_PROCID" in env:
        return _from_slurm(env, default_port)
    return LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr=LOOPBACK, master_port=None)


def _from_torchrun(env: Mapping[str, str]) -> LaunchEnv:
    missing = [key for key in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if key not in env]
    if missing:
        raise LaunchError(
            f"RANK is set but {', '.join(missing)} is not; launch with torchrun (which sets all of them) or unset"
            " RANK to run as a single process"
        )
    master_port = int(env["MASTER_PORT"])
    if master_port == 0:
        # torchrun passes "--master-port 0" through verbatim; every rank would then wait for a server on port 0.
        raise LaunchError(
            "MASTER_PORT is 0 (torchrun --master-port 0); use torchrun --standalone to get a free port, or name"
            " a real port"
        )
    return LaunchEnv(
        rank=int(env["RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        master_addr=env["MASTER_ADDR"],
        master_port=master_port,
    )


def _from_slurm(env: Mapping[str, str], default_port: int) -> LaunchEnv:
    """One process per task, started by srun (a bare python in the batch script would wait for SLURM_NTASKS ranks
    that never come, until parallel.timeout_minutes)."""
    master_addr = env.get("MASTER_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR")
    if not master_addr and env.get("SLURM_JOB_NODELIST"):
        master_addr = first_slurm_host(env["SLURM_JOB_NODELIST"])
    if not master_addr:
        raise LaunchError(
            "running under Slurm (SLURM_PROCID is set) but none of MASTER_ADDR, SLURM_LAUNCH_NODE_IPADDR or"
            " SLURM_JOB_NODELIST names the rendezvous host; export MASTER_ADDR in the job script"
        )
    return LaunchEnv(
        rank=int(env["SLURM_PROCID"]),
        world_size=int(env.get("SLURM_NTASKS", "1")),
        local_rank=int(env.get("SLURM_LOCALID", "0")),
        master_addr=master_addr,
        master_port=int(env.get("MASTER_PORT") or default_port),
    )


def first_slurm_host(nodelist: str) -> str:
    """The first host of a compressed Slurm node list: "gpu[007-009,012],cpu1" gives "gpu007"."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    prefix, ranges, suffix = match.groups()
    first_index = ranges.split(",")[0].split("-")[0] if ranges else ""
    host = f"{prefix}{first_index}{suffix}"
    if not host:
        raise LaunchError(f"cannot read a host name from SLURM_JOB_NODELIST={nodelist!r}; export MASTER_ADDR")
    return host


def _url_host(addr: str) -> str:
    """IPv6 literals need brackets inside a tcp:// URL."""
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
