"""Context parallelism on sliding-window layers: bytes the halo exchange sends against the all-gather.

One SWA layer of MiMo-V2-Flash as the stage-3 layout shards it (tp 4: 16 query heads, 2 KV heads, dk 192, dv 128,
window 128, a sink, BF16, micro-batch 1) runs forward and backward on real gloo ranks (cp 2 and cp 4, 8,192
tokens), once with each exchange of mimo's core attention (``parallel.cp_window_exchange``). The exchange code
counts what it sends (``SENT_BYTES``: the halo's point-to-point messages exactly, the all-gather as (cp - 1) times
the rank's keys and values, which every rank sends in a ring all-gather and in its backward's reduce-scatter).

From the measured bytes per token the bench derives the stage-3 figure (262,144 tokens, cp 8): the all-gather
sends (cp - 1) x seq / cp tokens' keys and values per rank and pass, the halo at most 2 x window (the window before
each of a rank's two chunks). Goal (issue 13): the halo sends >= 896x less per rank at stage 3 (229,376 tokens'
keys and values against 256).

Run: python bench/bench_cp.py [--seq 8192]
"""

import argparse
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from mimo.model.config import AttentionType
from mimo.model.core_attention import SINK_SOFTMAX_TYPE, LocalCoreAttention
from mimo.parallel.config import ALLGATHER, CP_WINDOW_EXCHANGES, HALO
from mimo.parallel.context_parallel import SENT_BYTES
from mimo.parallel.megatron_patches import apply_megatron_patches
from mimo.parallel.sequence_chunks import load_balanced_chunks
from mimo.recipes import load_config

STAGE3 = "mimo_v2_flash_stage3"
GOAL = 896.0
BF16_BYTES = 2
PASSES = ("forward", "backward")


@dataclass(frozen=True)
class Shape:
    """One SWA layer as one rank of the stage-3 layout holds it."""

    seq: int
    cp: int
    tp: int
    query_heads: int
    kv_heads: int
    query_dim: int
    value_dim: int
    window: int

    @property
    def chunk(self) -> int:
        return self.seq // (2 * self.cp)


def stage3_shape() -> Shape:
    cfg = load_config(config_name=STAGE3)
    model, tp = cfg.model, cfg.parallel.tp
    return Shape(
        seq=cfg.train.seq_length,
        cp=cfg.parallel.cp,
        tp=tp,
        query_heads=model.num_attention_heads // tp,
        kv_heads=model.num_kv_heads(AttentionType.SLIDING) // tp,
        query_dim=model.head_dim,
        value_dim=model.v_head_dim,
        window=model.sliding_window,
    )


def swa_layer(shape: Shape, exchange: str, groups: ProcessGroupCollection) -> LocalCoreAttention:
    config = TransformerConfig(
        num_layers=1,
        hidden_size=shape.query_heads * shape.query_dim,
        num_attention_heads=shape.query_heads,
        num_query_groups=shape.kv_heads,
        kv_channels=shape.query_dim,
        window_size=(shape.window, 0),
        softmax_type=SINK_SOFTMAX_TYPE,
        params_dtype=torch.bfloat16,
        use_cpu_initialization=True,
        attention_dropout=0.0,
    )
    return LocalCoreAttention(
        config, 1, AttnMaskType.causal, "self", cp_comm_type=exchange, pg_collection=groups
    ).bfloat16()


def _rank(rank: int, shape: Shape, store: str, out_dir: str) -> None:
    """One layer's forward and backward with each exchange; the bytes this rank sent, by exchange and pass."""
    torch.set_num_threads(1)
    # megatron's all-gather allocates on "the current CUDA device"
    apply_megatron_patches(cuda=False, transformer_engine=False, fused_adam=False)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=shape.cp)
    try:
        singles = [dist.new_group([r]) for r in range(shape.cp)]
        groups = ProcessGroupCollection()
        groups.tp, groups.cp = singles[rank], dist.group.WORLD
        local = 2 * shape.chunk
        sent = {}
        for exchange in CP_WINDOW_EXCHANGES:
            layer = swa_layer(shape, exchange, groups)
            query = torch.randn(local, 1, shape.query_heads, shape.query_dim, dtype=torch.bfloat16)
            key = torch.randn(local, 1, shape.kv_heads, shape.query_dim, dtype=torch.bfloat16)
            value = torch.randn(local, 1, shape.kv_heads, shape.value_dim, dtype=torch.bfloat16)
            inputs = [t.requires_grad_() for t in (query, key, value)]
            before = SENT_BYTES.copy()
            layer(*inputs, None).float().square().mean().backward()
            sent[exchange] = {step: (SENT_BYTES - before)[exchange, step] for step in PASSES}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(sent))
    finally:
        dist.destroy_process_group()


def measure(shape: Shape) -> list[dict]:
    """Bytes each rank sent: [rank][exchange][pass]."""
    with tempfile.TemporaryDirectory(prefix="mimo_bench_cp_") as tmp:
        mp.spawn(_rank, args=(shape, os.path.join(tmp, "store"), tmp), nprocs=shape.cp, join=True)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(shape.cp)]


def halo_tokens(shape: Shape, rank: int) -> int:
    """Tokens a rank sends per pass when window <= chunk: the window after each of its chunks whose successor is
    on another rank (rank cp - 1 holds chunk cp, its first chunk's successor; rank 0's second chunk is the last)."""
    first, second = load_balanced_chunks(rank, shape.cp)
    return shape.window * ((first + 1) != shape.cp) + shape.window * (second != 2 * shape.cp - 1)


def report(shape: Shape, sent: list[dict]) -> float:
    """Print one cp's measurement; return the measured bytes per token and pass (keys + values)."""
    gathered = [rank[ALLGATHER]["forward"] + rank[ALLGATHER]["backward"] for rank in sent]
    halo = [rank[HALO]["forward"] + rank[HALO]["backward"] for rank in sent]
    halo_token_count = [halo_tokens(shape, r) for r in range(shape.cp)]
    per_token = sum(rank[HALO]["forward"] for rank in sent) / sum(halo_token_count)
    gather_per_token = sent[0][ALLGATHER]["forward"] / ((shape.cp - 1) * 2 * shape.chunk)
    print(f"cp {shape.cp}, seq {shape.seq:,} (chunks of {shape.chunk:,} tokens), per SWA layer and micro-batch:")
    for rank in range(shape.cp):
        print(
            f"  rank {rank}: all-gather {gathered[rank] / 2**20:8.2f} MiB, halo {halo[rank] / 2**10:7.1f} KiB"
            f" ({halo_token_count[rank]} tokens per pass)"
        )
    closed_form = shape.kv_heads * (shape.query_dim + shape.value_dim) * BF16_BYTES
    print(
        f"  bytes per token and pass: halo {per_token:,.0f}, all-gather {gather_per_token:,.0f}"
        f" (closed form: KV heads x (dk + dv) x 2 = {closed_form:,})"
    )
    expected = (shape.cp - 1) * 2 * shape.chunk / max(halo_token_count)
    print(
        f"  the rank sending most: all-gather / halo = {max(gathered) / max(halo):.1f}x"
        f" (closed form (cp - 1) * seq / cp / {max(halo_token_count)} halo tokens = {expected:.1f}x)"
    )
    return per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192)
    args = parser.parse_args()
    stage3 = stage3_shape()
    print(
        f"SWA layer at tp {stage3.tp}: {stage3.query_heads} query heads, {stage3.kv_heads} KV heads, dk"
        f" {stage3.query_dim}, dv {stage3.value_dim}, window {stage3.window}, BF16, micro-batch 1"
    )
    per_token = []
    for cp in (2, 4):
        shape = replace(stage3, seq=args.seq, cp=cp)
        per_token.append(report(shape, measure(shape)))
    token_bytes = max(per_token)
    gathered = 2 * (stage3.cp - 1) * (stage3.seq // stage3.cp) * token_bytes
    halo = 2 * 2 * stage3.window * token_bytes
    print(
        f"stage 3 ({stage3.seq:,} tokens, cp {stage3.cp}), per SWA layer and micro-batch, forward + backward, the"
        f" rank sending most: all-gather {gathered / 2**20:,.0f} MiB, halo {halo / 2**10:,.0f} KiB ->"
        f" {gathered / halo:,.0f}x less (goal >= {GOAL:,.0f}x)"
    )


if __name__ == "__main__":
    main()
