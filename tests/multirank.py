"""Multi-rank tests without a port picked ahead and released: the test process hosts one TCP store per
rendezvous on a port the OS gives it, keeps it open while the ranks run, and the ranks connect to it as torchrun's
workers connect to their agent's store (``TORCHELASTIC_USE_AGENT_STORE``).

Ranks are spawned, not forked: earlier tests in this process may have run gloo, whose threads a forked child
inherits half-alive (the child's process-group set-up then deadlocks).
"""

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

LOOPBACK = "127.0.0.1"
STORE_TIMEOUT = timedelta(minutes=3)
"""How long a rank waits for the others at a rendezvous before the test fails."""


@contextmanager
def rendezvous_ports(count: int) -> Iterator[list[int]]:
    """Ports of ``count`` TCP stores hosted by this process until the block ends."""
    stores = [
        dist.TCPStore(LOOPBACK, 0, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT) for _ in range(count)
    ]
    try:
        yield [store.port for store in stores]
    finally:
        stores.clear()  # the servers close with their last reference


def join_rendezvous(rank: int, world_size: int, port: int) -> None:
    """Describe this rank to the next process-group start (torchrun's variables), connecting to the test's store."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR=LOOPBACK,
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE=str(True),
    )


def _entry(rank: int, fn: Callable, nprocs: int, ports: list[int], args: tuple) -> None:
    join_rendezvous(rank, nprocs, ports[0])
    fn(rank, ports, *args)


def spawn_ranks(fn: Callable, nprocs: int, *args, rendezvous: int = 1) -> None:
    """Run ``fn(rank, ports, *args)`` on ``nprocs`` spawned ranks; each rank's environment names the first of
    ``rendezvous`` stores (call ``join_rendezvous`` with the next port before starting another process group)."""
    with rendezvous_ports(rendezvous) as ports:
        mp.start_processes(_entry, args=(fn, nprocs, ports, args), nprocs=nprocs, join=True, start_method="spawn")
