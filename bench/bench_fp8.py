"""Emulated FP8 against BF16 on the main job: how far the loss curves drift apart, and what the emulation costs.

1. The main job (recipes/config.yaml: the tiny model, 250 steps) in BF16 and with ``precision.fp8`` emulated,
   same seed and data. Prints the LM loss of both at every logged step and their relative gap; the end loss is
   the mean over the last ``--last`` logged steps. Goal: the FP8 run ends within 2% of BF16, and the curves are
   not identical (the emulation really rounds).
2. Cost: seconds per training step of each run (the emulation's overhead over BF16 on this machine), and one
   linear layer's forward + backward, emulated FP8 against BF16, at the tiny model's FFN shape and a larger one.
   No goal: the emulation exists to reproduce FP8 numerics on any machine, not to be fast.

Run: python bench/bench_fp8.py [--steps N] [--recipes blockwise mxfp8] [--last K]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mimo.model.fp8_emulation import fp8_emulated_linear
from mimo.model.precision import FP8_SCALINGS
from mimo.recipes import load_config
from mimo.train.trainer import run_training

GOAL_GAP = 0.02
"""The FP8 run's end LM loss within 2% of the BF16 run's."""
GEMM_SHAPES = ((1024, 128, 384), (4096, 1024, 4096))
"""(tokens, in, out): the tiny model's dense FFN at one micro-batch, and a larger layer."""
GEMM_REPEATS = 5


def train(run_dir: Path, cache: Path, steps: int, precision: list[str]) -> tuple[list[dict], float]:
    """Run the main job; its logged records and the wall seconds per step (start-up excluded)."""
    cfg = load_config([f"run.dir={run_dir}", f"data.cache_dir={cache}", f"train.steps={steps}", *precision])
    run_training(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
    step_seconds = statistics.median(tokens_per_step / r["tokens_per_s"] for r in records[1:] or records)
    return records, step_seconds


def end_loss(records: list[dict], last: int) -> float:
    return statistics.fmean(r["lm_loss"] for r in records[-last:])


def gemm_seconds(tokens: int, fan_in: int, fan_out: int, scaling=None) -> float:
    """Best of a few forward + backward passes of one BF16 linear layer, emulated FP8 when ``scaling`` is set."""
    inputs = torch.randn(tokens, fan_in, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(fan_out, fan_in, dtype=torch.bfloat16, requires_grad=True)
    best = float("inf")
    for _ in range(GEMM_REPEATS):
        start = time.perf_counter()
        out = F.linear(inputs, weight) if scaling is None else fp8_emulated_linear(inputs, weight, scaling)
        out.float().sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=load_config().train.steps, help="default: the main job's")
    parser.add_argument("--recipes", nargs="+", default=["blockwise"], choices=sorted(FP8_SCALINGS))
    parser.add_argument("--last", type=int, default=3, help="logged steps averaged for the end loss")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "data_cache"
        bf16, bf16_step = train(Path(tmp) / "bf16", cache, args.steps, ["precision.dtype=bf16"])
        runs = {
            recipe: train(Path(tmp) / recipe, cache, args.steps, ["precision.dtype=bf16", f"precision.fp8={recipe}"])
            for recipe in args.recipes
        }

    print(f"\nmain job, {args.steps} steps: LM loss, BF16 vs emulated FP8 (relative gap)")
    print(f"{'step':>6} {'bf16':>9} " + " ".join(f"{recipe:>20}" for recipe in runs))
    for index, record in enumerate(bf16):
        cells = []
        for records, _ in runs.values():
            fp8 = records[index]["lm_loss"]
            cells.append(f"{fp8:9.4f} ({(fp8 - record['lm_loss']) / record['lm_loss']:+.2%})")
        print(f"{record['step']:>6} {record['lm_loss']:9.4f} " + " ".join(f"{cell:>20}" for cell in cells))

    reference = end_loss(bf16, args.last)
    for recipe, (records, step_seconds) in runs.items():
        gap = (end_loss(records, args.last) - reference) / reference
        largest = max(abs(a["lm_loss"] - b["lm_loss"]) for a, b in zip(records, bf16))
        verdict = "PASS" if abs(gap) <= GOAL_GAP and largest > 0 else "FAIL"
        print(
            f"{recipe}: end LM loss (mean of the last {args.last} logged steps) {gap:+.2%} vs BF16, largest"
            f" per-step difference {largest:.4f} (goal |gap| <= {GOAL_GAP:.0%} and not identical): {verdict}"
        )
        print(f"{recipe}: {step_seconds:.2f} s per step vs BF16 {bf16_step:.2f} s: {step_seconds / bf16_step:.2f}x")

    torch.manual_seed(0)
    for tokens, fan_in, fan_out in GEMM_SHAPES:
        base = gemm_seconds(tokens, fan_in, fan_out)
        for recipe in args.recipes:
            emulated = gemm_seconds(tokens, fan_in, fan_out, FP8_SCALINGS[recipe])
            print(
                f"linear [{tokens}x{fan_in}] x [{fan_in}x{fan_out}] forward + backward: {recipe} emulated"
                f" {emulated * 1e3:.1f} ms vs BF16 {base * 1e3:.1f} ms: {emulated / base:.1f}x (no goal)"
            )


if __name__ == "__main__":
    main()
