"""The parallel layout a run asks for. Data parallelism is never configured: it is what the world size leaves."""

from dataclasses import dataclass

HALO, ALLGATHER = "halo", "allgather"
CP_WINDOW_EXCHANGES = (HALO, ALLGATHER)


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel degree (attention heads, dense FFN, embedding/head vocab)."""
    pp: int = 1
    """Pipeline-parallel degree."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved 1F1B); None means no interleaving."""
    ep: int = 1
    """Expert-parallel degree."""
    etp: int = 1
    """Tensor-parallel degree inside each expert."""
    cp: int = 1
    """Context-parallel degree (sequence split across ranks)."""
    cp_window_exchange: str = HALO
    """How sliding-window layers get the keys and values their queries see under cp > 1: "halo" (each chunk
    receives the ``window`` tokens before it from the ranks holding them, point to point) or "allgather" (every
    rank's, as global layers on the local backend). Both are exact; halo moves O(window) tokens instead of
    O(seq)."""
    sequence_parallel: bool | None = None
    """None turns it on exactly when tp > 1 (megatron-core needs it for TP with MoE)."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1 style)."""
    pipeline_first_stage_layers: int | None = None
    """Layers on the first pipeline stage when stages are uneven (the embedding lives there)."""
    pipeline_last_stage_layers: int | None = None
    """Layers on the last pipeline stage when stages are uneven (head and MTP live there)."""
    backend: str | None = None
    """torch.distributed backend; None picks nccl with CUDA and gloo without."""
    timeout_minutes: int = 30
    """How long collectives (and process-group start-up) wait for a missing rank before failing."""
    master_port: int = 29500
    """Rendezvous port under Slurm without MASTER_PORT (torchrun sets its own; a lone process finds a free one)."""
