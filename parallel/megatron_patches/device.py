"""Patches for machines without CUDA: megatron-core creates CUDA tensors, streams, events and RNG states from
every module at any time, and these stand-ins put all of it on the CPU (see ``mimo.parallel.megatron_patches``)."""

import contextlib
import logging
import multiprocessing
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from mimo.parallel.megatron_patches import Patch

_CPU = torch.device("cpu")
SHARED_RNG_WARNING = "CPU RNG state changed within GPU RNG context"


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


def _redirect_cuda_placements() -> None:
    """Entered for the rest of the process: megatron creates CUDA tensors from every module, at any time."""
    _CudaToCpuMode().__enter__()


def _patch_cuda_rng_helpers() -> None:
    """The RNG tracker reads and writes CUDA generators through private helpers (lazily, per device)."""
    from megatron.core.tensor_parallel import random as mp_random

    def get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.default_generator.get_state()

    def set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.default_generator.set_state(new_state)

    mp_random._get_cuda_rng_state = get_rng_state
    mp_random._set_cuda_rng_state = set_rng_state


def _fork_checkpoint_results_queue() -> None:
    """The checkpoint writer's result queue lives in a "spawn" manager so no CUDA context is forked; spawning
    re-imports the launcher's __main__, which hangs any script without an import guard. Without CUDA there is no
    context to protect, and "fork" (already used for the writer workers themselves) re-imports nothing."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def fork_results_queue() -> Any:
        if filesystem_async._results_queue is None:
            filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
        return filesystem_async._results_queue

    filesystem_async._get_write_results_queue = fork_results_queue


def _copy_staged_tensors(write_buckets: list, non_blocking: bool = True) -> list:
    """The CPU worker's stand-in for ``FileSystemWriterAsync.preload_tensors``: copy every tensor of the rank's write
    buckets (a GPU run copies them to host memory at this point)."""
    return [
        (file_name, storage_key, (bytes_data, [(item, tensor.clone()) for item, tensor in tensor_data]))
        for file_name, storage_key, (bytes_data, tensor_data) in write_buckets
    ]


def _checkpoint_worker_loop(*args: Any, **kwargs: Any) -> None:
    """Entry of the spawned persistent checkpoint worker on CPU, in place of ``PersistentAsyncCaller.async_loop``.

    The worker is a fresh process without mimo's stand-ins: it needs one for its first call,
    ``torch.cuda.set_device(rank % torch.cuda.device_count())``. And it must copy the tensors it is handed while
    training waits for it (``preload_q.join()``): on a GPU that copy is the device-to-host staging, but megatron
    passes CPU tensors on as they are (pickling only moves their storage to shared memory), so the worker would
    write tensors that training goes on changing. Then megatron's own loop runs, unchanged.
    """
    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    _patch_torch_cuda()
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    FileSystemWriterAsync.preload_tensors = staticmethod(_copy_staged_tensors)
    megatron_loop = PersistentAsyncCaller.async_loop  # this process never applied the patch below
    if megatron_loop is _checkpoint_worker_loop:
        raise RuntimeError("the checkpoint worker's loop points back at itself: it must run in a fresh process")
    megatron_loop(*args, **kwargs)


def _run_checkpoint_worker_on_cpu() -> None:
    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller

    PersistentAsyncCaller.async_loop = staticmethod(_checkpoint_worker_loop)


class _DropSharedRngWarning(logging.Filter):
    """The RNG tracker warns when the CPU RNG advances inside a fork of the CUDA RNG. Here the two are the same
    generator by design, so the warning fires on every dropout and means nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return SHARED_RNG_WARNING not in record.getMessage()


def _silence_shared_rng_warning() -> None:
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropSharedRngWarning())


def _run_fused_helpers_eagerly() -> None:
    """megatron wraps small fused helpers (router scoring, activations) in torch.compile for GPU kernel fusion.
    On CPU that only costs seconds of compilation per process (and a C++ toolchain) and makes results depend on
    inductor's CPU codegen."""
    torch._dynamo.config.disable = True


PATCHES = (
    Patch(
        "torch_cuda_entry_points",
        "no_cuda",
        "torch.cuda.current_device/synchronize/Stream/Event/RNG exist and name a GPU",
        _patch_torch_cuda,
    ),
    Patch(
        "cuda_placements_to_cpu",
        "no_cuda",
        "device='cuda' (or an ordinal), Tensor.cuda() and 'torch.cuda.*' type names work",
        _redirect_cuda_placements,
    ),
    Patch(
        "cuda_rng_helpers",
        "no_cuda",
        "tensor_parallel.random's private CUDA RNG getters/setters reach a CUDA generator",
        _patch_cuda_rng_helpers,
    ),
    Patch(
        "checkpoint_writer_fork",
        "no_cuda",
        "the async checkpoint writer must spawn (not fork) its result queue's manager",
        _fork_checkpoint_results_queue,
    ),
    Patch(
        "checkpoint_worker_cpu",
        "no_cuda",
        "the persistent async checkpoint worker selects its rank's GPU and stages tensors by copying them to host",
        _run_checkpoint_worker_on_cpu,
    ),
    Patch(
        "shared_rng_warning",
        "no_cuda",
        "the CPU and CUDA RNGs are different generators",
        _silence_shared_rng_warning,
    ),
    Patch(
        "eager_fused_helpers",
        "no_cuda",
        "torch.compile'd fused helpers are worth compiling",
        _run_fused_helpers_eagerly,
    ),
)
