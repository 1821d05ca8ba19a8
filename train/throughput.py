"""Throughput against the hardware's peak: model TFLOP/s per device and MFU.

The FLOPs are ``mimo.model.accounting``'s training FLOPs per token (forward and backward of every matrix product,
attention scores as computed: causal, and capped at the window on sliding-window layers, MTP blocks and LM head
included; activation recomputation not counted), times the tokens trained per second, over the devices.

The peak is the device's dense BF16 peak from the planner's GPU table, looked up by the name CUDA reports. Without
a table entry (a CPU, or a GPU the table lacks) it is measured once at start, as the best of a few square matrix
products in the run's parameter dtype, and the log says so: the MFU is then against what this process achieves on
a plain matmul, not against a datasheet.
"""

import logging
import time
from dataclasses import dataclass

import torch

from mimo.model.accounting import flops_per_token
from mimo.model.config import ModelConfig
from mimo.train.tools.plan.settings import GPUS

logger = logging.getLogger("mimo")

TERA = 1e12
MEGA = 1e6
PROBE_SIZE = {"cpu": 1024, "cuda": 8192}
"""Side of the square matrices multiplied to measure a peak: big enough to run at full speed on that device."""
PROBE_REPEATS = 3


@dataclass(frozen=True)
class Peak:
    tflops: float
    """Per device."""
    source: str
    """Where the number comes from, for the log."""


def table_peak(device_name: str) -> Peak | None:
    for spec in GPUS.values():
        if spec.device_name == device_name:
            return Peak(spec.bf16_tflops, f"dense BF16 peak of the {spec.name} (mimo-plan's GPU table)")
    return None


def measured_peak(device: torch.device, dtype: torch.dtype) -> Peak:
    """The best of a few square matmuls on ``device``. Inputs are constants, so no random-number stream moves."""
    size = PROBE_SIZE[device.type]
    a = torch.full((size, size), 0.5, dtype=dtype, device=device)
    b = torch.full((size, size), 0.25, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(PROBE_REPEATS):
        _synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    tflops = 2 * size**3 / best / TERA
    return Peak(tflops, f"measured at start: a {size}x{size} {dtype} matmul on {_describe(device)}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) + " (not in mimo-plan's GPU table)"
    return f"CPU with {torch.get_num_threads()} threads"


def device_peak(device: torch.device, dtype: torch.dtype) -> Peak:
    known = table_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return known or measured_peak(device, dtype)


class Throughput:
    """Turns tokens/s of the whole job into model TFLOP/s per device and MFU."""

    def __init__(self, model: ModelConfig, seq_length: int, world_size: int, peak: Peak) -> None:
        self.flops_per_token = flops_per_token(model, seq_length).training
        self.world_size = world_size
        self.peak = peak
        logger.info(
            "MFU: %.2f MFLOP per token per training step against a peak of %.3g TFLOP/s per device (%s)",
            self.flops_per_token / MEGA,
            peak.tflops,
            peak.source,
        )

    def of(self, tokens_per_s: float) -> dict[str, float]:
        tflops = tokens_per_s * self.flops_per_token / self.world_size / TERA
        return {"tflops_per_device": tflops, "mfu": tflops / self.peak.tflops}
