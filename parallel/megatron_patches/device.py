"""Patches for machines without CUDA: megatron-core creates CUDA tensors, streams, events and RNG states from
every module at any time, and these stand-ins put all of it on the CPU (see ``mimo.parallel.megatron_patches``)."""

import contextlib
import functools
import importlib
import logging
import multiprocessing
from collections.abc import Callable
from typing import Any

import torch

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


def _placing_on_cpu(factory: Callable) -> Callable:
    """``factory`` with a device argument naming CUDA replaced by the CPU."""

    @functools.wraps(factory)
    def placed(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _names_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        return factory(*args, **kwargs)

    return placed


class _TorchWithCpuFactories:
    """What the name ``torch`` means inside a megatron module that writes ``device="cuda"`` literally: torch
    itself, except for the factories it calls that way, which place their tensors on the CPU."""

    def __init__(self, factories: tuple[str, ...]) -> None:
        for name in factories:
            setattr(self, name, _placing_on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


CUDA_LITERAL_FACTORIES = ("zeros", "tensor")
CUDA_LITERAL_MODULES = (
    "megatron.core.optimizer.clip_grads",  # grad norm, clipping, zero counting: every step
    "megatron.core.optimizer.optimizer",  # found_inf, overflow buffer and loss scale of the optimizers
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens of every schedule
    "megatron.core.transformer.moe.moe_utils",  # track_moe_metrics' layer-wise tracker
)
"""The megatron-core 0.16.1 modules on mimo's paths whose torch.zeros / torch.tensor calls pass device="cuda"
(found by grepping the installed source). Left out, off mimo's paths: transformer/utils.py's default causal mask
(mimo's attention builds its own), the rerun state machine (disabled), tensor_parallel/data.py's broadcast_data and
dist_checkpointing/exchange_utils.py (fully parallel strategies, not used). A placement missed here fails loudly:
the CPU build of torch refuses any CUDA device."""


def _place_literal_cuda_tensors_on_cpu() -> None:
    for module_name in CUDA_LITERAL_MODULES:
        importlib.import_module(module_name).torch = _TorchWithCpuFactories(CUDA_LITERAL_FACTORIES)


_tensor_type = torch.Tensor.type


def _type_name_as_on_gpu(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """``Tensor.type()`` with the ``torch.cuda.*`` spelling megatron compares against (a conversion is untouched)."""
    if args or kwargs:
        return _tensor_type(tensor, *args, **kwargs)
    return _tensor_type(tensor).replace("torch.", "torch.cuda.", 1)


def _already_on_device(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``Tensor.cuda()`` where the CPU is the device: the tensor is already there."""
    return tensor


def _with_tensor_methods(function: Callable, **methods: Callable) -> Callable:
    """``function`` running with ``torch.Tensor``'s ``methods`` replaced for the duration of each call only."""

    @functools.wraps(function)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        saved = {name: torch.Tensor.__dict__.get(name) for name in methods}
        for name, method in methods.items():
            setattr(torch.Tensor, name, method)
        try:
            return function(*args, **kwargs)
        finally:
            for name, method in saved.items():
                if method is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, method)

    return wrapped


def _spell_type_names_as_cuda() -> None:
    """The functions that pick a code path by comparing ``param.type()`` with ``'torch.cuda.FloatTensor'`` and
    friends (and raise on anything else) see the CUDA spelling while they run; every other caller gets torch's."""
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    for owner in (distrib_optimizer.DistributedOptimizer, optimizer.Float16OptimizerWithFloat16Params):
        owner.__init__ = _with_tensor_methods(owner.__init__, type=_type_name_as_on_gpu)
    # Called every step (an assert on each gradient's type); optimizer.py imported it by name.
    clip = _with_tensor_methods(clip_grads.clip_grad_by_total_norm_fp32, type=_type_name_as_on_gpu)
    clip_grads.clip_grad_by_total_norm_fp32 = optimizer.clip_grad_by_total_norm_fp32 = clip


def _keep_cuda_copies_on_cpu() -> None:
    """The functions that move a tensor with ``.cuda()`` before a collective keep it where it is."""
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    # Pipeline stages sharing the embedding all-reduce it at construction.
    LanguageModule.setup_embeddings_and_output_layer = _with_tensor_methods(
        LanguageModule.setup_embeddings_and_output_layer, cuda=_already_on_device
    )
    # The optimizer-state gather of a checkpoint save.
    DistributedOptimizer.get_parameter_state_dp_zero = _with_tensor_methods(
        DistributedOptimizer.get_parameter_state_dp_zero, cuda=_already_on_device
    )


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
        "cuda_literal_devices",
        "no_cuda",
        "torch.zeros/torch.tensor(..., device='cuda') in the optimizer, clipping, schedules and MoE tracker work",
        _place_literal_cuda_tensors_on_cpu,
    ),
    Patch(
        "cuda_type_names",
        "no_cuda",
        "parameters and gradients report type() 'torch.cuda.FloatTensor' (or Half/BFloat16) to the optimizers",
        _spell_type_names_as_cuda,
    ),
    Patch(
        "cuda_copies",
        "no_cuda",
        "Tensor.cuda() works before the embedding all-reduce and the optimizer-state gather",
        _keep_cuda_copies_on_cpu,
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
