"""``mimo-report RUN_DIR [RUN_DIR ...] --out DIR``: figures and a summary of runs (see the package docstring)."""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mimo.recipes.errors import run_command
from mimo.train.tools.report.figures import draw_all
from mimo.train.tools.report.runs import read_runs
from mimo.train.tools.report.summary import write_summary

PROG = "mimo-report"
DEFAULT_OUT_SUBDIR = "report"


def report(run_dirs: Sequence[Path], out: Path) -> str:
    """Draw the figures and write the summary; returns what was written, for the terminal."""
    runs = read_runs(list(run_dirs))
    drawn = draw_all(runs, out)
    summary = write_summary(runs, drawn, out)
    lines = [f"wrote {figure.path}" for figure in drawn if figure.path is not None]
    lines += [f"skipped {figure.name}: {figure.note}" for figure in drawn if figure.note]
    return "\n".join([*lines, f"wrote {summary}"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="PNG figures (loss, schedule, throughput, expert load, data mixture) and summary.md of one or"
        " more mimo runs, from their metrics.jsonl and config.yaml; several runs are drawn on the same axes. Runs"
        " that are still going are read as far as they got.",
        epilog="example: mimo-report runs/tiny runs/tiny-ep2 --out reports/ep2",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, help=f"output directory (default: RUN_DIR/{DEFAULT_OUT_SUBDIR})")
    args = parser.parse_args(argv)
    out = args.out or args.run_dirs[0] / DEFAULT_OUT_SUBDIR
    written: list[str] = []
    code = run_command(PROG, lambda: written.append(report(args.run_dirs, out)))
    if not code:
        print(written[0])
    return code


if __name__ == "__main__":
    sys.exit(main())
