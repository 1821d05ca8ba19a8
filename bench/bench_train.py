"""Training throughput on CPU: mimo's Trainer against transformers' MiMoV2FlashForCausalLM with a plain torch
AdamW loop, on the main job's tiny model (MTP off on both sides), the same global batch, micro-batch and sequence
length, the same machine, process and torch thread count.

The reference is what a user would write with transformers: gradient accumulation over the step's micro-batches,
gradient clipping at ``optim.clip_grad`` (as transformers' Trainer does by default) and torch's AdamW with the
recipe's hyper-parameters. mimo runs ``Trainer.step()``, the step ``mimo-train`` runs: megatron-core's schedule,
DDP wrapper and distributed optimizer, on its own data loader. The two sides alternate for several rounds and
each side's median tokens/s counts (the machine may be shared). Goal: ratio >= 1.0.

Run: python bench/bench_train.py [--rounds N] [--steps S] [key=value overrides of the recipe]
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mimo.model.hf.configs import mimo_config_to_hf
from mimo.recipes.compose import load_config
from mimo.recipes.schema import MimoConfig
from mimo.train.commands import quiet_expected_warnings
from mimo.train.trainer import Trainer

GOAL = 1.0
"""mimo's tokens/s over transformers' at least this."""
BENCH_OVERRIDES = ("model.mtp_num_layers=0", "logging.wandb=off")
"""transformers' MiMo-V2-Flash has no MTP blocks; the bench writes nothing beyond its temporary run directory."""
SEED = 1234


@dataclass
class BenchConfig:
    rounds: int = 5
    """Alternating measurements of each side; the median of each counts."""
    steps: int = 10
    """Optimizer steps per measurement."""
    warmup_steps: int = 3
    """Steps run on each side before the first measurement (allocator, lazy initialisation)."""


class TransformersLoop:
    """transformers' MiMo-V2-Flash built from the same model config, trained the plain way."""

    def __init__(self, cfg: MimoConfig) -> None:
        from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

        torch.manual_seed(SEED)
        self.model = MiMoV2FlashForCausalLM(MiMoV2FlashConfig(**mimo_config_to_hf(cfg.model))).train()
        optim = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=optim.lr,
            betas=(optim.adam_beta1, optim.adam_beta2),
            eps=optim.adam_eps,
            weight_decay=optim.weight_decay,
        )
        self.clip_grad = optim.clip_grad
        train = cfg.train
        self.accumulation = train.global_batch_size // train.micro_batch_size
        self.shape = (train.micro_batch_size, train.seq_length)
        self.generator = torch.Generator().manual_seed(SEED)
        self.vocab_size = cfg.model.vocab_size

    def step(self) -> None:
        self.optimizer.zero_grad()
        for _ in range(self.accumulation):
            tokens = torch.randint(self.vocab_size, self.shape, generator=self.generator)
            loss = self.model(input_ids=tokens, labels=tokens).loss
            (loss / self.accumulation).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()


def tokens_per_s(step: Callable[[], object], steps: int, tokens_per_step: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * tokens_per_step / (time.perf_counter() - start)


def bench(bench_cfg: BenchConfig, overrides: Sequence[str]) -> dict[str, list[float]]:
    """Each round's tokens/s of mimo and of transformers, measured alternately in this process."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config([*BENCH_OVERRIDES, f"run.dir={run_dir}", *overrides])
        total_steps = bench_cfg.warmup_steps + bench_cfg.rounds * bench_cfg.steps
        cfg.train.steps = total_steps
        cfg.checkpoint.interval = total_steps + 1
        tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
        reference = TransformersLoop(cfg)
        with Trainer(cfg) as trainer:
            sides = {"mimo": trainer.step, "transformers": reference.step}
            for step in sides.values():
                for _ in range(bench_cfg.warmup_steps):
                    step()
            measured: dict[str, list[float]] = {name: [] for name in sides}
            for _ in range(bench_cfg.rounds):
                for name, step in sides.items():
                    measured[name].append(tokens_per_s(step, bench_cfg.steps, tokens_per_step))
    return measured


def main() -> None:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.micro_batch_size=2")
    args = parser.parse_args()
    quiet_expected_warnings()
    measured = bench(BenchConfig(args.rounds, args.steps, args.warmup_steps), args.overrides)
    mimo, reference = statistics.median(measured["mimo"]), statistics.median(measured["transformers"])
    rounds = [ours / theirs for ours, theirs in zip(measured["mimo"], measured["transformers"])]
    print(
        f"train tokens/s on {torch.get_num_threads()} threads: mimo {mimo:,.0f}, transformers {reference:,.0f}:"
        f" ratio {mimo / reference:.2f} (rounds {min(rounds):.2f}-{max(rounds):.2f}; goal >= {GOAL:.1f})"
    )


if __name__ == "__main__":
    main()
