"""``summary.md``: the headline numbers of each run, the figures, and what could not be drawn."""

from collections.abc import Callable, Sequence
from pathlib import Path

from mimo.train.tools.report.figures import Drawn, format_tokens
from mimo.train.tools.report.runs import Run

SUMMARY_FILE = "summary.md"
RECENT_ROWS = 10
"""Throughput figures average the last this many logged rows (step 1's start-up left out)."""
MISSING = "-"


def _number(value: float | None, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


Column = tuple[str, Callable[[Run], str]]
COLUMNS: tuple[Column, ...] = (
    ("run", lambda run: run.name),
    ("status", lambda run: run.status),
    ("step", lambda run: str(run.rows[-1]["step"])),
    ("tokens", lambda run: format_tokens(run.rows[-1]["tokens"])),
    ("train loss (LM)", lambda run: _number(run.last("lm_loss"), ".4f")),
    ("val loss", lambda run: _number(run.last("val_loss"), ".4f")),
    ("val ppl", lambda run: _number(run.last("val_ppl"), ".1f")),
    ("val MTP acceptance", lambda run: _number(run.last("val_mtp_acceptance"), ".1%")),
    ("tokens/s", lambda run: _number(run.recent_mean("tokens_per_s", RECENT_ROWS), ",.0f")),
    ("TFLOP/s per device", lambda run: _number(run.recent_mean("tflops_per_device", RECENT_ROWS), ".3g")),
    ("MFU", lambda run: _number(run.recent_mean("mfu", RECENT_ROWS), ".1%")),
    ("peak memory (GiB)", lambda run: _number(run.last("peak_memory_gib"), ".2f")),
    ("MaxVio", lambda run: _number(run.last("moe_max_violation"), ".2f")),
)


def summary_text(runs: Sequence[Run], drawn: Sequence[Drawn], out: Path) -> str:
    lines = [
        "# mimo-report",
        "",
        "Runs: " + ", ".join(f"`{run.name}` ({run.directory})" for run in runs) + ".",
        f"Latest logged values; throughput columns average the last {RECENT_ROWS} logged intervals.",
        "",
        "| " + " | ".join(title for title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cell(run) for _, cell in COLUMNS) + " |" for run in runs]
    lines += ["", "## Figures", ""]
    for figure in drawn:
        if figure.path is not None:
            lines += [f"### {figure.name}", "", f"![{figure.name}]({figure.path.relative_to(out)})", ""]
    notes = [f"{figure.name}: not drawn, {figure.note}" for figure in drawn if figure.note]
    notes += [note for run in runs for note in run.notes]
    notes += [
        f"{run.name}: no validation logged (eval.interval=0, or an older mimo)"
        for run in runs
        if not run.has("val_loss")
    ]
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def write_summary(runs: Sequence[Run], drawn: Sequence[Drawn], out: Path) -> Path:
    path = out / SUMMARY_FILE
    path.write_text(summary_text(runs, drawn, out))
    return path
