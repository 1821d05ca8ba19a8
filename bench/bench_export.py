"""export-hf memory benchmark: the peak memory of a streaming export over the tool's own baseline, against the
model's FP32 bytes.

A ~220M-parameter model (mimo's tiny shape widened: hidden 1024, 8 heads of 128, dense FFN 4096, 8 experts of
2304, 883 MB in FP32) and the tiny model are saved as mimo checkpoints (seeded initial weights, config.yaml as a
run writes it), then each is exported in a fresh process. The baseline is that process's resident memory once
mimo, torch, megatron-core and transformers are imported; the peak is the highest resident memory during the
export (Linux's VmHWM, reset after the imports). Goal: peak over baseline <= 0.5x the large model's FP32 bytes
(before streaming, export held the whole model: 2.1 GB more than for the tiny model at this size).

Run: python bench/bench_export.py
"""

import multiprocessing
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GOAL_FP32_FRACTION = 0.5
FP32_BYTES = 4
MB = 10**6
PEAK_RESET = "5"
"""Writing this to /proc/self/clear_refs resets the process's peak resident memory (VmHWM)."""
COMMON = ("train.seq_length=32", "train.global_batch_size=1", "train.micro_batch_size=1")
MODELS = {
    "tiny": (),
    "wide (~220M)": (
        "model.hidden_size=1024",
        "model.num_attention_heads=8",
        "model.head_dim=128",
        "model.v_head_dim=128",
        "model.ffn_hidden_size=4096",
        "model.moe_ffn_hidden_size=2304",
    ),
}


@dataclass
class ExportMemory:
    baseline: int
    peak: int
    seconds: float
    tensor_bytes: int

    @property
    def over_baseline(self) -> int:
        return self.peak - self.baseline


def _memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; this benchmark needs Linux")


def save_checkpoint(run: Path, overrides: tuple[str, ...]) -> int:
    """Save the seeded initial model of ``overrides`` as a run's checkpoint; returns its parameter count."""
    from mimo.model.accounting import parameter_counts
    from mimo.model.builder import build_model
    from mimo.parallel.runtime import shutdown
    from mimo.recipes import load_config
    from mimo.recipes.compose import to_yaml
    from mimo.train.build import run_record, start_runtime
    from mimo.train.checkpoint.manager import CheckpointManager
    from mimo.train.config import RUN_CONFIG_FILE
    from mimo.train.records import TrainState

    cfg = load_config([f"run.dir={run}", *COMMON, *overrides])
    runtime = start_runtime(cfg)
    try:
        chunks = build_model(cfg.model, cfg.parallel, cfg.precision, seq_length=cfg.train.seq_length, seed=cfg.run.seed)
        CheckpointManager(cfg.checkpoint, cfg.model, runtime.device).save(
            TrainState(), chunks, None, run_record(cfg, runtime)
        )
        (run / RUN_CONFIG_FILE).write_text(to_yaml(cfg))
    finally:
        shutdown()
    return parameter_counts(cfg.model).total


def measure_export(run: Path, out: Path) -> ExportMemory:
    """Export in this (fresh) process and report its memory."""
    from mimo.train.tools.convert.exporter import export_hf

    Path("/proc/self/clear_refs").write_text(PEAK_RESET)
    baseline = _memory_kb("VmRSS") * 1024
    start = time.perf_counter()
    files = export_hf(run, out)
    seconds = time.perf_counter() - start
    tensor_bytes = sum(path.stat().st_size for path in files if path.suffix == ".safetensors")
    return ExportMemory(baseline, _memory_kb("VmHWM") * 1024, seconds, tensor_bytes)


def _call(results, function, args) -> None:
    results.put(function(*args))


def _in_fresh_process(function, *args):
    """``function(*args)`` in a new process (not a pool worker: the checkpoint writer starts processes of its
    own, which a daemonic worker may not)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_call, args=(results, function, args))
    process.start()
    result = results.get()
    process.join()
    return result


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mimo_bench_export_") as tmp:
        results = {}
        for name, overrides in MODELS.items():
            run = Path(tmp) / name.split()[0]
            params = _in_fresh_process(save_checkpoint, run, overrides)
            results[name] = (params, _in_fresh_process(measure_export, run, Path(tmp) / f"{run.name}_hf"))
    for name, (params, memory) in results.items():
        fp32 = params * FP32_BYTES
        print(
            f"{name}: {params / 1e6:.1f}M parameters ({fp32 / MB:.0f} MB FP32); baseline {memory.baseline / MB:.0f} MB,"
            f" peak over it {memory.over_baseline / MB:.1f} MB = {memory.over_baseline / fp32:.3f}x FP32 bytes;"
            f" {memory.tensor_bytes / MB / memory.seconds:.0f} MB/s written"
        )
    (_, small), (params, large) = results.values()
    ratio = large.over_baseline / (params * FP32_BYTES)
    verdict = "met" if ratio <= GOAL_FP32_FRACTION else "MISSED"
    print(
        f"export peak over baseline / FP32 bytes: {ratio:.3f} (goal <= {GOAL_FP32_FRACTION}: {verdict});"
        f" the wide model's export needs {(large.over_baseline - small.over_baseline) / MB:.1f} MB more than the"
        " tiny model's"
    )


if __name__ == "__main__":
    main()
