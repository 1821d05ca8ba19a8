"""Build-once coordination: one rank writes shared files while the others wait, then all read."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.distributed as dist

from mimo.data.errors import DataError


def rank_zero_first(build: Callable[[], None], is_done: Callable[[], bool], what: str) -> None:
    """Runs ``build`` on global rank 0 while the other ranks wait at a barrier.

    ``build`` must skip work that is already done, since a later run calls it again. If rank 0
    fails, it still reaches the barrier (so nobody hangs) and re-raises; the others notice through
    ``is_done`` and stop with an error pointing at rank 0. Files are assumed to be on a file system
    all ranks share, as megatron-core's own index caches assume.
    """
    if not dist.is_initialized():
        build()
        return
    failure = None
    if dist.get_rank() == 0:
        try:
            build()
        except Exception as error:  # noqa: BLE001 - re-raised below, after releasing the other ranks
            failure = error
    dist.barrier()
    if failure is not None:
        raise failure
    if not is_done():
        raise DataError(f"rank 0 failed to build {what}; see rank 0's error")


@contextmanager
def process_group_for_build() -> Iterator[None]:
    """Makes torch.distributed usable while datasets are built, as megatron-core's builder needs.

    megatron-core's BlendedDataset asks ``torch.distributed.get_rank()`` whenever it builds an index
    cache, without checking that a process group exists. A run that has one is left alone; a single
    process (tests, benchmarks, notebooks) gets a private one-rank gloo group for the duration.
    """
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
