"""Where logged numbers go: a console line, ``<run.dir>/metrics.jsonl`` and, when enabled, wandb.

Only the main rank writes; the training loop has already reduced every value across ranks.
"""

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mimo.recipes.errors import ConfigError
from mimo.train.config import METRICS_FILE, LoggingConfig
from mimo.train.expert_load import MAX_VIOLATION, PER_LAYER, TOKENS_PER_EXPERT

logger = logging.getLogger("mimo")

WANDB_MODES = ("off", "offline", "online")
CONSOLE_FIELDS = (
    ("loss", "loss {:.4f}"),
    ("lm_loss", "lm {:.4f}"),
    ("mtp_loss", "mtp {:.4f}"),
    ("aux_loss", "aux {:.2e}"),
    ("lr", "lr {:.3e}"),
    ("grad_norm", "gnorm {:.3f}"),
    ("global_batch_size", "gbs {}"),
    ("tokens_per_s", "tok/s {:.0f}"),
    ("tflops_per_device", "{:.3g} TFLOP/s/dev"),
    ("mfu", "mfu {:.1%}"),
    ("peak_memory_gib", "mem {:.2f}GiB"),
    (MAX_VIOLATION, "maxvio {:.2f}"),
    ("val_loss", "val {:.4f}"),
    ("val_ppl", "val ppl {:.1f}"),
    ("val_mtp_loss", "val mtp {:.4f}"),
    ("val_mtp_acceptance", "val accept {:.1%}"),
)


class MetricsWriter:
    def __init__(
        self, run_dir: str, cfg: LoggingConfig, run_config: dict[str, Any], enabled: bool, moe_layers: Sequence[int]
    ):
        """``moe_layers``: the decoder layers of the MoE layers, which name the per-layer series."""
        if cfg.wandb not in WANDB_MODES:
            raise ConfigError(f"logging.wandb={cfg.wandb!r}; choose one of {', '.join(WANDB_MODES)}")
        self.enabled = enabled
        self.moe_layers = list(moe_layers)
        self._wandb = None
        self._jsonl = None
        if not enabled:
            return
        self._jsonl = open(Path(run_dir) / METRICS_FILE, "a", buffering=1)
        if cfg.wandb != "off":
            import wandb

            self._wandb = wandb.init(
                project=cfg.wandb_project,
                dir=run_dir,
                mode=cfg.wandb,
                config=run_config,
                name=Path(run_dir).name,
                id=_stable_run_id(run_dir),
                resume="allow",
            )

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(self._for_wandb(values), step=step)
        parts = [fmt.format(values[key]) for key, fmt in CONSOLE_FIELDS if values.get(key) is not None]
        if len(values.get("samples_per_dataset", {})) > 1:
            total = sum(values["samples_per_dataset"].values()) or 1
            parts.append(
                "data " + " ".join(f"{name} {n / total:.0%}" for name, n in values["samples_per_dataset"].items())
            )
        logger.info("step %d | tokens %d | %s", step, values.get("tokens", 0), " | ".join(parts))

    def _for_wandb(self, values: dict[str, Any]) -> dict[str, Any]:
        """Per-layer lists become one series per layer; each layer's expert load a histogram of load / mean load."""
        import wandb

        flat = {key: value for key, value in values.items() if key not in PER_LAYER and key != TOKENS_PER_EXPERT}
        for key, name in PER_LAYER.items():
            for index, value in enumerate(values.get(key, [])):
                flat[f"moe/{name}/layer_{self.moe_layers[index]}"] = value
        for index, counts in enumerate(values.get(TOKENS_PER_EXPERT, [])):
            mean = sum(counts) / len(counts) or 1
            relative = [count / mean for count in counts]
            flat[f"moe/relative_load/layer_{self.moe_layers[index]}"] = wandb.Histogram(relative)
        return flat

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()


class DatasetTally:
    """Counts which blended datasets the micro-batches came from, so the log shows what fed each interval.

    Wraps this rank's data iterator; ``take`` sums the counts over the data-parallel replicas (the only ranks
    that see different samples) and starts a new interval.
    """

    def __init__(self, iterator: Iterator[dict], names: Sequence[str]):
        self._iterator = iterator
        self.names = list(names)
        self._counts = torch.zeros(len(self.names), dtype=torch.float64)

    def __iter__(self) -> "DatasetTally":
        return self

    def __next__(self) -> dict:
        batch = next(self._iterator)
        self._counts += torch.bincount(batch["dataset_id"], minlength=len(self.names)).to(torch.float64)
        return batch

    def take(self, group, device: torch.device) -> dict[str, int]:
        counts = self._counts.to(device, copy=True)
        dist.all_reduce(counts, group=group)
        self._counts.zero_()
        return {name: int(n) for name, n in zip(self.names, counts.cpu().tolist())}


class StepProgress:
    """Shows that a long step is alive: full-scale steps run hundreds of micro-batches for minutes."""

    def __init__(self, enabled: bool, every_seconds: float):
        self.enabled = enabled
        self.every_seconds = every_seconds
        self.step, self.total, self.done = 0, 0, 0
        self._start = self._last = 0.0

    def start(self, step: int, num_microbatches: int) -> None:
        self.step, self.total, self.done = step, num_microbatches, 0
        self._start = self._last = time.monotonic()

    def micro_batch(self) -> None:
        if not self.enabled:
            return
        self.done += 1
        now = time.monotonic()
        if now - self._last >= self.every_seconds:
            self._last = now
            logger.info(
                "step %d: micro-batch %d/%d after %.0f s",
                self.step,
                min(self.done, self.total),
                self.total,
                now - self._start,
            )


def _stable_run_id(run_dir: str) -> str:
    """One wandb run per run directory, so a resumed job continues the same curves."""
    path = os.path.abspath(run_dir)
    return Path(path).name + "-" + hashlib.sha1(path.encode()).hexdigest()[:8]
