"""Data pipeline benchmark: preprocessing against raw tokenization, and the loader against a GPU node.

1. mimo-preprocess end to end (JSONL on disk -> merged .bin/.idx, all cores) against the raw throughput
   of the same tokenizer on the same texts and cores (in-memory batches, Rust thread pool over all
   cores). Goal: ratio >= 0.8.
2. build_data_iterators: micro-batches per second of one loader process at the stage-1 sequence
   length, against the tokens per second one GPU node trains on (from the model's active parameters,
   peak FLOP/s and an assumed MFU). A ratio well above 1 means data loading is never the bottleneck.

Run: python bench/bench_data.py [--copies N] [--repeats R]
"""

import argparse
import gzip
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mimo.data.config import DataConfig, PreprocessConfig
from mimo.data.indexed import token_dtype
from mimo.data.loader import DataRank, build_data_iterators
from mimo.data.preprocess import preprocess
from mimo.data.shipped_corpus import shipped_corpus_path
from mimo.data.tokenizer import encode_documents, load_hf_tokenizer
from mimo.data.train_tokenizer import SHIPPED_TOKENIZER_DIR


@dataclass
class BenchConfig:
    copies: int = 4
    """Times the shipped corpus (1.5 MB of text) is repeated in the benchmark input."""
    repeats: int = 3
    """Alternating measurements of each side; the best of each counts (the machine may be shared)."""
    raw_batch: int = 1000
    """Texts per batched tokenizer call in the raw measurement."""
    loader_micro_batches: int = 200
    seq_length: int = 32768
    """MiMo-V2-Flash stage-1 sequence length."""
    micro_batch_size: int = 1
    seed: int = 1234
    gpus_per_node: int = 8
    peak_flops_per_gpu: float = 989e12
    """H100 SXM dense BF16."""
    mfu: float = 0.4
    """Assumed model FLOPs utilisation of a well-tuned MoE run."""
    active_params: float = 15e9
    """MiMo-V2-Flash parameters active per token."""
    flops_per_param_token: float = 6.0
    """Forward + backward: 6 FLOPs per active parameter per token (attention ignored)."""


def _texts() -> list[str]:
    with gzip.open(shipped_corpus_path(), "rt", encoding="utf-8") as reader:
        return [json.loads(line)["text"] for line in reader]


def _raw_tokens_per_s(texts: list[str], batch: int) -> float:
    """The tokenizer alone: batched calls, its Rust thread pool on every core, ids materialised."""
    tokenizer = load_hf_tokenizer(SHIPPED_TOKENIZER_DIR)
    dtype = token_dtype(len(tokenizer))
    start = time.perf_counter()
    tokens = sum(
        doc.size
        for i in range(0, len(texts), batch)
        for doc in encode_documents(tokenizer, texts[i : i + batch], dtype)
    )
    return tokens / (time.perf_counter() - start)


def _preprocess_tokens_per_s(jsonl: Path, output: Path) -> float:
    summary = preprocess(PreprocessConfig(inputs=[str(jsonl)], output=str(output)))
    return summary.tokens / summary.seconds


def bench_preprocess(cfg: BenchConfig, work: Path) -> Path:
    texts = _texts() * cfg.copies
    jsonl = work / "bench.jsonl"
    with open(jsonl, "w", encoding="utf-8") as writer:
        writer.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    megabytes = jsonl.stat().st_size / 1e6
    print(f"input: {len(texts):,} documents, {megabytes:.1f} MB JSONL, {os.cpu_count()} cores")
    raw, pipeline = [], []
    for repeat in range(cfg.repeats):
        output = work / f"out{repeat}"
        pipeline.append(_preprocess_tokens_per_s(jsonl, output))
        raw.append(_raw_tokens_per_s(texts, cfg.raw_batch))
        print(f"  run {repeat}: preprocess {pipeline[-1]:,.0f} tokens/s, raw tokenizer {raw[-1]:,.0f} tokens/s")
    ratio = max(pipeline) / max(raw)
    print(f"preprocess/raw tokenizer throughput: {ratio:.2f} (goal >= 0.8)")
    return work / "out0"


def bench_loader(cfg: BenchConfig, prefix: Path, work: Path) -> None:
    data_cfg = DataConfig(blend=[str(prefix)], cache_dir=str(work / "cache"))
    samples = cfg.loader_micro_batches * cfg.micro_batch_size
    data = build_data_iterators(
        data_cfg,
        run_dir=str(work),
        seq_length=cfg.seq_length,
        seed=cfg.seed,
        train_samples=samples,
        consumed_samples=0,
        rank=DataRank(dp_rank=0, dp_size=1, micro_batch_size=cfg.micro_batch_size),
    )
    next(data.train)
    start = time.perf_counter()
    for _ in range(cfg.loader_micro_batches):
        next(data.train)
    samples_per_s = samples / (time.perf_counter() - start)
    gpu_tokens_per_s = cfg.peak_flops_per_gpu * cfg.mfu / (cfg.flops_per_param_token * cfg.active_params)
    node_samples_per_s = cfg.gpus_per_node * gpu_tokens_per_s / cfg.seq_length
    print(
        f"loader: {samples_per_s:,.1f} samples/s of {cfg.seq_length:,} tokens "
        f"({samples_per_s * cfg.seq_length:,.0f} tokens/s) in one process"
    )
    print(
        f"a node of {cfg.gpus_per_node} GPUs at {cfg.mfu:.0%} MFU trains {node_samples_per_s * cfg.seq_length:,.0f} "
        f"tokens/s = {node_samples_per_s:.2f} samples/s"
    )
    print(f"loader/node consumption: {samples_per_s / node_samples_per_s:,.1f}x")


def main() -> None:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=defaults.copies)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    args = parser.parse_args()
    cfg = BenchConfig(copies=args.copies, repeats=args.repeats)
    with tempfile.TemporaryDirectory(prefix="mimo_bench_data_") as tmp:
        work = Path(tmp)
        prefix = bench_preprocess(cfg, work)
        bench_loader(cfg, prefix, work)


if __name__ == "__main__":
    main()
