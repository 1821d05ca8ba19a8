"""Lets the real megatron-core stack run on a CUDA-less machine (CPU tensors, gloo), so tests and small
experiments exercise the same code paths as a GPU run instead of a re-implementation.

megatron-core assumes CUDA in a handful of places (device arguments, streams and events, the CUDA RNG, tensor
type names). Each patch below rewrites exactly one such assumption and says which. The patches were verified
against the megatron-core versions in ``VERIFIED_MEGATRON_VERSIONS``; any other version is refused up front
because the patched internals may have moved, and a failure deep inside a training step is much harder to read.
"""

import contextlib
import logging
import multiprocessing
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

VERIFIED_MEGATRON_VERSIONS: tuple[str, ...] = ("0.16.1",)

_CPU = torch.device("cpu")
_mode: TorchFunctionMode | None = None


class UnsupportedMegatronVersion(RuntimeError):
    """The installed megatron-core was never checked against the CPU patches."""


def megatron_version() -> str:
    """The installed megatron-core version string (read at call time so a test can fake it)."""
    from megatron.core import package_info

    return package_info.__version__


def check_megatron_version() -> None:
    """Refuse unverified megatron-core versions before any patch touches their internals."""
    version = megatron_version()
    if version not in VERIFIED_MEGATRON_VERSIONS:
        raise UnsupportedMegatronVersion(
            f"mimo's CPU compatibility layer was verified with megatron-core {', '.join(VERIFIED_MEGATRON_VERSIONS)}"
            f" but megatron-core {version} is installed. Install a verified version"
            f" (pip install megatron-core=={VERIFIED_MEGATRON_VERSIONS[-1]}), run on a GPU machine, or re-verify"
            " mimo/parallel/cpu_compat.py against the new version and add it to VERIFIED_MEGATRON_VERSIONS."
        )


def is_enabled() -> bool:
    """Whether the patches are active in this process."""
    return _mode is not None


def enable_cpu_compat() -> bool:
    """Patch torch and megatron-core so megatron runs on CPU. Safe to call repeatedly.

    Returns True when the layer is active, False when CUDA is present (nothing is patched then: a GPU run must
    never silently compute on the CPU).
    """
    global _mode
    check_megatron_version()
    if torch.cuda.is_available():
        return False
    if _mode is not None:
        return True
    _patch_torch_cuda()
    _patch_megatron()
    _silence_shared_rng_warning()
    _patch_torch_adam_checkpoint_load()
    _patch_grad_norm()
    # megatron wraps its small fused helpers (router scoring, activations) in torch.compile for GPU kernel
    # fusion, applied at import time. On CPU that only costs seconds of compilation per process (and a C++
    # toolchain) and makes results depend on inductor's CPU codegen, so run them eagerly.
    torch._dynamo.config.disable = True
    _mode = _CudaToCpuMode()
    # Entered for the rest of the process: megatron creates CUDA tensors from every module, at any time.
    _mode.__enter__()
    return True


def _names_cuda(device: Any) -> bool:
    """True for every spelling of a CUDA device megatron uses: "cuda", "cuda:0", torch.device, bare ordinal."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA placements to the CPU for every torch call, wherever megatron makes it."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        # Module.cuda()/Tensor.cuda() are called on parameters and buffers; the CPU build raises on them.
        if func is torch.Tensor.cuda:
            return args[0]
        # The optimizer and grad clipping check type() == 'torch.cuda.FloatTensor' to pick the fp32 path.
        if func is torch.Tensor.type and len(args) == 1 and "dtype" not in kwargs:
            return func(*args, **kwargs).replace("torch.", "torch.cuda.", 1)
        # Factories receive device=torch.cuda.current_device(), "cuda" or an ordinal.
        if _names_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": _CPU}
        # Tensor.to(device, ...) takes the device positionally (an int there is always an ordinal).
        if func is torch.Tensor.to and len(args) > 1 and _names_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _NoOpEvent:
    """Stands in for torch.cuda.Event: CPU work is synchronous, so every event has already happened."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: Any) -> float:
        return 0.0


class _NoOpStream:
    """Stands in for torch.cuda.Stream (the MoE dispatcher overlaps its device-to-host copies on one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: _NoOpEvent | None = None) -> _NoOpEvent:
        return event if event is not None else _NoOpEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _NoOpStream()


def _patch_torch_cuda() -> None:
    """Give torch.cuda the handful of entry points megatron calls unconditionally."""
    cuda = torch.cuda
    # Passed as device= everywhere; returning the CPU device makes those tensors land on the CPU directly.
    cuda.current_device = lambda: _CPU
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpEvent
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    # The "CUDA" RNG is the CPU default generator: that is the generator CPU kernels (dropout, init) draw from,
    # so megatron's model-parallel RNG tracker forks the randomness that is actually used.
    cuda.get_rng_state = lambda device="cuda": torch.default_generator.get_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.default_generator.set_state(new_state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))


class _DropSharedRngWarning(logging.Filter):
    """The RNG tracker warns when the CPU RNG advances inside a fork of the CUDA RNG. Here the two are the same
    generator by design, so the warning fires on every dropout and means nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _silence_shared_rng_warning() -> None:
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropSharedRngWarning())


def _patch_megatron() -> None:
    """Patch the megatron-core internals that bypass the torch.cuda entry points above."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # The RNG tracker reads and writes CUDA generators through these private helpers (lazily, per device).
    def get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.default_generator.get_state()

    def set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.default_generator.set_state(new_state)

    mp_random._get_cuda_rng_state = get_rng_state
    mp_random._set_cuda_rng_state = set_rng_state

    # router_gating_linear tests `te_general_gemm is not None`, but the name is only bound when Transformer
    # Engine imports: moe_router_dtype="fp32" would raise NameError without it.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # The alltoall dispatcher turns its split sizes into numpy arrays only when they live on a GPU; gloo's
    # all_to_all_single rejects the CPU tensors left otherwise and wants integer sequences.
    move_to_cpu = moe_utils.maybe_move_tensor_to_cpu

    def splits_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor):
            return tensor.numpy()
        return move_to_cpu(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = splits_to_host

    # The checkpoint writer's result queue lives in a "spawn" manager so no CUDA context is forked; spawning
    # re-imports the launcher's __main__, which hangs any script without an import guard. Without CUDA there
    # is no context to protect, and "fork" (already used for the writer workers themselves) re-imports nothing.
    def fork_results_queue() -> Any:
        if filesystem_async._results_queue is None:
            filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
        return filesystem_async._results_queue

    filesystem_async._get_write_results_queue = fork_results_queue


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
