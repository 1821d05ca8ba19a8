"""Train the same seed and global batch under two parallel layouts and report how far their numbers drift apart.

mimo's promise is that a layout changes speed and memory, never the numbers; this tool checks it for any pair of
layouts, step by step, on the losses and gradient norms every run logs. Each run is a real ``mimo-train`` job
launched with torchrun, so what is compared is exactly what users run.

    python -m mimo.train.tools.compare_layouts --a "" --b "parallel.tp=2" --nproc-b 2 -- train.steps=4
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mimo.recipes.errors import MimoError, run_command
from mimo.train.config import METRICS_FILE

PROG = "compare_layouts"
COMPARED = ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm")


@dataclass
class Layout:
    overrides: list[str]
    nproc: int

    @property
    def label(self) -> str:
        return f"{self.nproc} proc " + (" ".join(self.overrides) or "(single layout defaults)")


class RunFailed(MimoError, RuntimeError):
    """One of the compared runs exited with an error; the message has its command and output."""


def run_layout(
    layout: Layout, common: Sequence[str], run_dir: str, *, config_name: str = "config", timeout_s: int = 600
) -> list[dict[str, float]]:
    """Run mimo-train under ``layout`` logging every step; returns the metrics records of this invocation."""
    metrics = Path(run_dir) / METRICS_FILE
    seen = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={layout.nproc}",
        "--standalone",
        "-m",
        "mimo.train",
        "--config-name",
        config_name,
        f"run.dir={run_dir}",
        "logging.interval=1",
        *common,
        *layout.overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    if done.returncode != 0:
        raise RunFailed(
            f"{layout.label} failed (exit {done.returncode}):\n{shlex.join(command)}\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
        )
    return [json.loads(line) for line in metrics.read_text().splitlines()[seen:]]


def relative_differences(a: list[dict[str, float]], b: list[dict[str, float]]) -> dict[str, list[float]]:
    """Per compared metric, |a - b| / max(|a|, tiny) step by step."""
    if [r["step"] for r in a] != [r["step"] for r in b]:
        raise ValueError(f"the runs logged different steps: {[r['step'] for r in a]} vs {[r['step'] for r in b]}")
    return {
        key: [abs(x[key] - y[key]) / max(abs(x[key]), 1e-12) for x, y in zip(a, b)]
        for key in COMPARED
        if all(key in r for r in a + b)
    }


def compare(
    a: Layout, b: Layout, common: Sequence[str], workdir: str | None = None, **kwargs
) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        shared_cache = f"data.cache_dir={tmp}/data_cache"
        runs = [
            run_layout(layout, [*common, shared_cache], f"{tmp}/{name}", **kwargs)
            for name, layout in (("a", a), ("b", b))
        ]
    return relative_differences(*runs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a", default="", help="overrides of layout A (quoted, space separated)")
    parser.add_argument("--b", required=True, help="overrides of layout B")
    parser.add_argument("--nproc-a", type=int, default=1)
    parser.add_argument("--nproc-b", type=int, default=1)
    parser.add_argument("--config-name", default="config")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest relative difference accepted")
    parser.add_argument("common", nargs="*", help="overrides for both runs (e.g. train.steps=4)")
    args = parser.parse_args(argv)
    a = Layout(shlex.split(args.a), args.nproc_a)
    b = Layout(shlex.split(args.b), args.nproc_b)
    results: list[dict[str, list[float]]] = []
    code = run_command(PROG, lambda: results.append(compare(a, b, args.common, config_name=args.config_name)))
    if code:
        return code
    diffs = results[0]
    print(f"A: {a.label}\nB: {b.label}")
    for key, values in diffs.items():
        print(f"{key:>10}: max rel diff {max(values):.2e}  per step " + " ".join(f"{v:.1e}" for v in values))
    worst = max(max(v) for v in diffs.values())
    print(f"{'PASS' if worst <= args.tolerance else 'FAIL'}: worst {worst:.2e} vs tolerance {args.tolerance:.0e}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
