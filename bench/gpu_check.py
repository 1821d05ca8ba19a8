"""What mimo does on its first GPU, in one command sized for a few minutes of one H200 (bench/gpu_check.sh).

Stages, most valuable first; each is timed out on its own and a failure is recorded, not fatal:
  environment   versions, device, Transformer Engine
  tiny          the tiny model in FP32 resumes on the device from the CPU run's step-1 checkpoint: its next steps'
                LM losses against the CPU run's
  proxy_bf16    the proxy recipe (3.36B, every layer full size) in BF16 at 4K: tokens/s, TFLOP/s, MFU
  proxy_fp8     the same steps in emulated FP8 (blockwise): per-step LM-loss gap to BF16, step-time ratio
  attention     mimo's core attention forward + backward, sliding window (window 128, sink) vs global (causal)
  proxy_bf16_long  the proxy at 32K with full recomputation
  proxy_te_fp8  with Transformer Engine: TE's FP8 kernels, against the emulation and BF16
``--cpu`` runs the same stages at toy size (the tiny model stands in for the proxy; the "device" is the CPU, so
the tiny comparison only checks that resuming and changing the micro-batch keep the numbers). The summary goes
to ``<out>/gpu_check.json`` and a table to stdout.
"""

import argparse
import json
import math
import os
import platform
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from gpu_runs import Runner, RunResult, StageFailed, copy_checkpoint, relative_gaps, scratch_root

from mimo.model.accounting import flops_per_token
from mimo.model.core_attention import causal_attention, sliding_window_attention
from mimo.recipes import load_config
from mimo.train.tools.plan.settings import GPUS

TINY_TOLERANCE = 1e-3
"""Largest relative LM-loss difference accepted between the device and the CPU over the compared steps: both run
FP32 from the same checkpoint and data, but the GPU sums in other orders (fused attention, cuBLAS)."""
TINY_CPU_MICRO_BATCH = 4
TINY_DEVICE_MICRO_BATCH = 2
"""The device run uses another micro-batch size (the same global batch and so the same loss), which makes it a
different layout to the checkpoint: per-rank RNG streams, whose format differs between CPU and CUDA, are then not
restored (MiMo has no dropout; nothing else reads them)."""
ERROR_CHARS = 2000
"""How much of a failed stage's error the summary keeps."""
RECOMPUTE_FULL = ("model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=1")


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    swa_kv_heads: int
    ga_kv_heads: int
    head_dim: int
    v_head_dim: int
    window: int
    seqs: tuple[int, ...]
    repeats: int


@dataclass(frozen=True)
class CheckSizes:
    tiny_steps: int
    proxy_model: tuple[str, ...]
    proxy_seqs: tuple[int, int]
    """The short (BF16, FP8) and the long (BF16, full recomputation) sequence length."""
    proxy_batches: tuple[int, int]
    proxy_steps: int
    attention: AttentionShape
    budget_s: float
    """The whole check's deadline; a stage that would start after it is skipped."""
    run_timeout_s: float


GPU = CheckSizes(
    tiny_steps=5,
    proxy_model=("model=proxy",),
    proxy_seqs=(4096, 32768),
    proxy_batches=(4, 1),
    proxy_steps=4,
    attention=AttentionShape(64, 8, 4, 192, 128, 128, seqs=(4096, 32768), repeats=5),
    budget_s=500,
    run_timeout_s=150,
)
CPU = CheckSizes(
    tiny_steps=2,
    proxy_model=("model=tiny",),
    proxy_seqs=(128, 256),
    proxy_batches=(2, 1),
    proxy_steps=2,
    attention=AttentionShape(4, 4, 2, 48, 32, 16, seqs=(128, 512), repeats=2),
    budget_s=400,
    run_timeout_s=120,
)


def environment() -> dict:
    te_version = None
    try:
        import transformer_engine

        te_version = transformer_engine.__version__
    except ImportError:
        pass
    import megatron.core

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "transformer_engine": te_version,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def tiny(runner: Runner, sizes: CheckSizes, on_gpu: bool) -> dict:
    common = ["precision.dtype=fp32", f"train.steps={sizes.tiny_steps}", "train.global_batch_size=8"]
    cpu_dir, device_dir = runner.scratch / "tiny_cpu", runner.scratch / "tiny_device"
    cpu_only = {"CUDA_VISIBLE_DEVICES": ""}
    keep_all = ["checkpoint.interval=1", f"checkpoint.keep={sizes.tiny_steps + 1}"]
    cpu = runner.train_in(
        cpu_dir, [*common, f"train.micro_batch_size={TINY_CPU_MICRO_BATCH}", *keep_all], sizes.run_timeout_s, cpu_only
    )
    copy_checkpoint(cpu_dir, 1, device_dir)
    device = runner.train_in(
        device_dir, [*common, f"train.micro_batch_size={TINY_DEVICE_MICRO_BATCH}"], sizes.run_timeout_s
    )
    for run in (cpu, device):
        if run.failure:
            raise StageFailed(run.failure)
    reference = cpu.lm_losses()[1:]
    gaps = relative_gaps(device.lm_losses(), reference)
    worst = max(abs(gap) for gap in gaps)
    return {
        "compared": f"{'CUDA' if on_gpu else 'CPU (--cpu: no device)'} run resumed from the CPU run's step-1"
        f" checkpoint, steps 2..{sizes.tiny_steps}, micro-batch {TINY_DEVICE_MICRO_BATCH} vs {TINY_CPU_MICRO_BATCH}",
        "cpu_lm_losses": reference,
        "device_lm_losses": device.lm_losses(),
        "worst_relative_gap": worst,
        "tolerance": TINY_TOLERANCE,
        "passed": worst <= TINY_TOLERANCE,
    }


def proxy_overrides(sizes: CheckSizes, long: bool, te: bool, *extra: str) -> list[str]:
    index = 1 if long else 0
    overrides = [
        *sizes.proxy_model,
        f"train.seq_length={sizes.proxy_seqs[index]}",
        "train.micro_batch_size=1",
        f"train.global_batch_size={sizes.proxy_batches[index]}",
        f"train.steps={sizes.proxy_steps}",
        "precision.dtype=bf16",
        "checkpoint.keep=1",
        *(RECOMPUTE_FULL if long else ()),
        # Without Transformer Engine the experts run one GEMM each (mimo's local backend has no grouped GEMM).
        *(() if te else ("model.moe_grouped_gemm=false",)),
    ]
    return [*overrides, *extra]


def throughput(run: RunResult, overrides: list[str], peak_tflops: float | None) -> dict:
    cfg = load_config(overrides)
    tokens_per_s = run.tokens_per_s()
    tflops = flops_per_token(cfg.model, cfg.train.seq_length).training * tokens_per_s / 1e12
    return {
        "seq_length": cfg.train.seq_length,
        "tokens_per_step": cfg.train.global_batch_size * cfg.train.seq_length,
        "tokens_per_s": tokens_per_s,
        "model_tflops_per_s": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        "peak_memory_gib": max(record["peak_memory_gib"] for record in run.records),
        "lm_losses": run.lm_losses(),
        "run_seconds": run.seconds,
        **({"failed_after_training": run.failure[-ERROR_CHARS:]} if run.failure else {}),
    }


GAP_PREFIX = "lm_loss_gap_vs_"
STEP_TIME_PREFIX = "step_time_vs_"


def compared_to(result: dict, reference: dict, label: str) -> dict:
    """Per-step relative LM-loss gap and step-time ratio of one proxy run to another of the same steps."""
    return {
        GAP_PREFIX + label: relative_gaps(result["lm_losses"], reference["lm_losses"]),
        STEP_TIME_PREFIX + label: reference["tokens_per_s"] / result["tokens_per_s"],
    }


def timed_backward(function, inputs: list[torch.Tensor], repeats: int) -> float:
    """Best forward + backward time in ms."""
    best = math.inf
    for _ in range(repeats + 1):  # the first pass warms up
        if inputs[0].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        function(*inputs).sum().backward()
        if inputs[0].is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def attention(shape: AttentionShape, device: torch.device) -> dict:
    """mimo's sliding-window (with sink) and global core attention at the proxy's geometry, BF16."""
    return {f"seq_{seq}": attention_at(shape, seq, device) for seq in shape.seqs}


def attention_at(shape: AttentionShape, seq: int, device: torch.device) -> dict:
    scale = 1 / math.sqrt(shape.head_dim)
    sink = torch.zeros(shape.heads, device=device, dtype=torch.bfloat16, requires_grad=True)
    kinds = {
        "swa_ms": (partial(sliding_window_attention, window=shape.window, scale=scale, sink=sink), shape.swa_kv_heads),
        "ga_ms": (partial(causal_attention, scale=scale), shape.ga_kv_heads),
    }
    entry: dict[str, float | str] = {}
    for key, (function, kv_heads) in kinds.items():
        dims = ((shape.heads, shape.head_dim), (kv_heads, shape.head_dim), (kv_heads, shape.v_head_dim))
        inputs = [
            torch.randn(1, heads, seq, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
            for heads, dim in dims
        ]
        try:
            entry[key] = timed_backward(function, inputs, shape.repeats)
        except torch.OutOfMemoryError as err:
            entry[key] = f"out of memory: {str(err).splitlines()[0]}"
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return entry


def run_stage(summary: dict, name: str, function, *args) -> dict | None:
    """Run one stage into ``summary``; any failure is recorded (with its traceback) and the check goes on."""
    start = time.monotonic()
    try:
        result = function(*args)
        summary[name] = {"status": "ok", **result}
    except Exception as err:  # a stage's failure is a finding, whatever its type
        detail = str(err) if isinstance(err, StageFailed) else traceback.format_exc()
        summary[name] = {"status": "failed", "error": detail[-ERROR_CHARS:]}
        result = None
    summary[name]["seconds"] = round(time.monotonic() - start, 1)
    print(f"[gpu_check] {name}: {summary[name]['status']} in {summary[name]['seconds']} s", flush=True)
    return result


def check(sizes: CheckSizes, scratch: Path, on_gpu: bool) -> dict:
    summary: dict = {"mode": "gpu" if on_gpu else "cpu", "sizes": asdict(sizes)}
    env = run_stage(summary, "environment", environment) or {}
    te = bool(env.get("transformer_engine"))
    device_name = env.get("device", "").lower()
    peak = next((gpu.bf16_tflops for key, gpu in GPUS.items() if on_gpu and key in device_name), None)
    runner = Runner(scratch, scratch / "data_cache", time.monotonic() + sizes.budget_s)
    run_stage(summary, "tiny", tiny, runner, sizes, on_gpu)

    def proxy(long: bool, *extra: str) -> dict:
        overrides = proxy_overrides(sizes, long, te, *extra)
        return throughput(runner.train("proxy", overrides, sizes.run_timeout_s), overrides, peak)

    bf16 = run_stage(summary, "proxy_bf16", proxy, False)
    emulated = run_stage(
        summary,
        "proxy_fp8",
        proxy,
        False,
        "precision.fp8=blockwise",
        "precision.fp8_backend=emulated",
        "model.moe_grouped_gemm=false",
    )
    if bf16 and emulated:
        summary["proxy_fp8"].update(compared_to(emulated, bf16, "bf16"))
    device = torch.device("cuda" if on_gpu else "cpu")
    run_stage(summary, "attention", attention, sizes.attention, device)
    run_stage(summary, "proxy_bf16_long", proxy, True)
    if te:
        te_fp8 = run_stage(summary, "proxy_te_fp8", proxy, False, "precision.fp8=blockwise", "precision.fp8_backend=te")
        for label, reference in (("bf16", bf16), ("emulated_fp8", emulated)):
            if te_fp8 and reference:
                summary["proxy_te_fp8"].update(compared_to(te_fp8, reference, label))
    else:
        summary["proxy_te_fp8"] = {"status": "skipped: transformer_engine is not importable"}
    return summary


def describe_tiny(stage: dict) -> str:
    verdict = "PASS" if stage["passed"] else "FAIL"
    return (
        f"worst LM-loss gap {stage['worst_relative_gap']:.1e} (tolerance {stage['tolerance']:.0e}) {verdict};"
        f" {stage['compared']}"
    )


def describe_proxy(stage: dict) -> str:
    mfu = f", MFU {stage['mfu']:.1%}" if stage["mfu"] is not None else ""
    text = (
        f"seq {stage['seq_length']}: {stage['tokens_per_s']:,.0f} tokens/s, {stage['model_tflops_per_s']:.3g}"
        f" TFLOP/s{mfu}, peak {stage['peak_memory_gib']:.1f} GiB"
        + ("; FAILED after training (see the JSON)" if "failed_after_training" in stage else "")
    )
    for key, value in stage.items():
        if key.startswith(GAP_PREFIX):
            text += f"; LM-loss gap to {key.removeprefix(GAP_PREFIX)} " + " ".join(f"{g:+.1e}" for g in value)
        elif key.startswith(STEP_TIME_PREFIX):
            text += f"; step time {value:.2f}x {key.removeprefix(STEP_TIME_PREFIX)}"
    return text


def describe_attention(stage: dict) -> str:
    def ms(value: float | str) -> str:
        return f"{value:.1f} ms" if isinstance(value, float) else value

    entries = [(key, entry) for key, entry in stage.items() if key.startswith("seq_")]
    return "; ".join(f"{key}: SWA {ms(entry['swa_ms'])}, GA {ms(entry['ga_ms'])}" for key, entry in entries)


def describe_environment(stage: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in stage.items() if key not in ("status", "seconds"))


def table(summary: dict) -> str:
    """The summary as lines a person reads first: one per stage."""
    lines = [f"gpu_check ({summary['mode']} mode)"]
    for name, stage in summary.items():
        if not isinstance(stage, dict) or "status" not in stage:
            continue
        if stage["status"] != "ok":
            details = stage.get("error", "").strip().splitlines()[-1:] or [""]
            lines.append(f"  {name:16} {stage['status']:8} {details[0]}")
            continue
        describe = describe_proxy if name.startswith("proxy") else DESCRIBE[name]
        lines.append(f"  {name:16} {'ok':8} {describe(stage)}")
    return "\n".join(lines)


DESCRIBE = {"environment": describe_environment, "tiny": describe_tiny, "attention": describe_attention}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="toy sizes on the CPU (what the tests run)")
    parser.add_argument("--out", default=os.environ.get("OUT") or ".", help="folder for gpu_check.json ($OUT)")
    args = parser.parse_args()
    on_gpu = not args.cpu
    if on_gpu and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device; run with --cpu for the toy-size check")
        return 2
    with tempfile.TemporaryDirectory(prefix="mimo-gpu-check-", dir=scratch_root()) as scratch:
        summary = check(CPU if args.cpu else GPU, Path(scratch), on_gpu)
    out = Path(args.out) / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(table(summary))
    print(f"summary: {out}")
    failed = [name for name, stage in summary.items() if isinstance(stage, dict) and stage.get("status") == "failed"]
    return 1 if failed or not summary.get("tiny", {}).get("passed", False) else 0


if __name__ == "__main__":
    raise SystemExit(main())
