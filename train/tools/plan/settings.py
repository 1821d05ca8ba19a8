"""What the planner assumes: the GPUs (memory, peak FLOPs, links), byte sizes, its own settings, and the layout a
recipe resolves to on a world size."""

from dataclasses import dataclass

from mimo.parallel.layout import LayoutError, ResolvedLayout, validate_layout
from mimo.recipes.errors import MimoError
from mimo.recipes.schema import MimoConfig

GIB = 2**30
SECONDS_PER_DAY = 86_400
BYTES = {"fp32": 4, "bf16": 2, "fp8": 1, "bool": 1, "int64": 8}
FP32 = BYTES["fp32"]
INT64 = BYTES["int64"]


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float
    """Device memory as the driver reports it."""
    bf16_tflops: float
    """Dense BF16 peak; MFU is quoted against it (also for FP8 runs)."""
    nvlink_gb_s: float
    """NVLink bandwidth per GPU and direction (GB/s), inside a node."""
    network_gb_s: float
    """Network bandwidth per GPU and direction (GB/s), between nodes (one 400 Gb/s NIC per GPU)."""
    gpus_per_node: int = 8
    """GPUs that share one NVLink domain."""
    device_name: str = ""
    """What ``torch.cuda.get_device_name()`` reports for it; training quotes its MFU against ``bf16_tflops``."""


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec(
        "H100 SXM 80GB",
        memory_gib=79.6,
        bf16_tflops=989.4,
        nvlink_gb_s=450.0,
        network_gb_s=50.0,
        device_name="NVIDIA H100 80GB HBM3",
    ),
    "h200": GpuSpec(
        "H200 SXM 141GB",
        memory_gib=140.4,
        bf16_tflops=989.4,
        nvlink_gb_s=450.0,
        network_gb_s=50.0,
        device_name="NVIDIA H200",
    ),
    "b200": GpuSpec(
        "B200 180GB",
        memory_gib=178.4,
        bf16_tflops=2250.0,
        nvlink_gb_s=900.0,
        network_gb_s=50.0,
        device_name="NVIDIA B200",
    ),
    # The Blackwell GPU of a GB200 NVL72 rack: a higher power limit than B200's (2.5 PFLOP/s dense BF16), 186 GB
    # of HBM3e, 72 GPUs in one NVLink domain.
    "gb200": GpuSpec(
        "GB200 186GB",
        memory_gib=184.0,
        bf16_tflops=2500.0,
        nvlink_gb_s=900.0,
        network_gb_s=50.0,
        gpus_per_node=72,
        device_name="NVIDIA GB200",
    ),
}


@dataclass(frozen=True)
class PlannerSettings:
    reserved_gib: float = 5.0
    """Kept free for the CUDA context, NCCL's buffers and the caching allocator's fragmentation."""
    mfu: float = 0.4
    """Model-FLOPs utilisation the time estimates assume."""
    backend: str = "te"
    """The modules whose saved activations are estimated: "te" (Transformer Engine, what mimo builds on a GPU
    with TE installed: flash attention, TE's norms) or "local" (mimo's local modules, what runs on CPU)."""


BACKENDS = ("te", "local")


class PlanError(MimoError, ValueError):
    """A recipe the planner cannot evaluate (bad layout or schedule); the message names what to change."""


def resolve_layout(cfg: MimoConfig, world_size: int) -> ResolvedLayout:
    try:
        return validate_layout(
            cfg.parallel,
            cfg.model,
            world_size,
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=cfg.train.micro_batch_size,
            seq_length=cfg.train.seq_length,
        )
    except LayoutError as err:
        raise PlanError(f"layout refused on {world_size} GPUs: {err}") from err
