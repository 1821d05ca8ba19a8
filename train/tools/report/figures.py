"""The figures of ``mimo-report``: one PNG each, every run on the same axes, tokens on the x axis.

Drawn with matplotlib's object interface on the Agg renderer (no display, no pyplot state). A figure whose
fields no run logged is not drawn; ``draw_all`` returns a note saying why instead. A row holds the values of the
logging interval that ends at its token count, so stepped curves hold each value over the interval before it.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

from mimo.train.tools.report.runs import Run

DPI = 110
PANEL_SIZE = (5.6, 3.6)
"""Inches per panel."""
TOKEN_SUFFIXES = ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K"))
TOKENS_LABEL = "tokens trained"
STAGE_STYLE = {"color": "0.45", "linestyle": ":", "linewidth": 1.0}
VALIDATION_STYLE = {"linestyle": "--", "marker": "o", "markersize": 3}
MAX_TICKS = 6
HEATMAP_WIDTH = 1.5
"""Panels per expert-load heatmap (it carries a colour bar)."""
MIN_HEATMAP_ROW = 2
"""Panels the row of heatmaps spans at least: the MaxVio curve below takes the same width."""
X_MARGIN = 1.03
"""The token axis ends this far past the last logged row."""


@dataclass(frozen=True)
class Drawn:
    name: str
    """What the figure shows, for the summary."""
    path: Path | None
    note: str | None = None
    """Why it was not drawn."""


def format_tokens(value: float, _position: int | None = None) -> str:
    for scale, suffix in TOKEN_SUFFIXES:
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def color(index: int) -> str:
    return f"C{index % 10}"


def _figure(rows: int, columns: int) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    return figure, axes


def _token_axis(ax: Axes, runs: Sequence[Run]) -> None:
    """Tokens from 0 to the furthest run, on every panel alike."""
    ax.set_xlim(0, max(run.rows[-1]["tokens"] for run in runs) * X_MARGIN)
    ax.xaxis.set_major_locator(MaxNLocator(MAX_TICKS))
    ax.xaxis.set_major_formatter(FuncFormatter(format_tokens))
    ax.set_xlabel(TOKENS_LABEL)
    ax.grid(alpha=0.3)


def _mark_stages(ax: Axes, runs: Sequence[Run]) -> None:
    """A dotted line where each stage starts, inside the drawn token range, with the stage's name written upwards
    just inside the stage."""
    last = max(run.rows[-1]["tokens"] for run in runs)
    boundaries: dict[int, str] = {}
    for run in runs:
        for name, (start, _end) in run.stages.items():
            if 0 < start <= last:
                boundaries.setdefault(start, name)
    for tokens, name in sorted(boundaries.items()):
        ax.axvline(tokens, **STAGE_STYLE)
        ax.annotate(
            name,
            (tokens, 1),
            xycoords=("data", "axes fraction"),
            xytext=(2, -4),
            textcoords="offset points",
            rotation=90,
            ha="left",
            va="top",
            fontsize="small",
            color=STAGE_STYLE["color"],
        )


def _save(figure: Figure, out: Path, file_name: str) -> Path:
    path = out / file_name
    figure.savefig(path)
    return path


def _lines(ax: Axes, runs: Sequence[Run], key: str, label: str, **style) -> bool:
    """Each run's ``key`` against tokens; False when no run has it."""
    drawn = False
    for index, run in enumerate(runs):
        tokens, values = run.series(key)
        if tokens:
            ax.plot(tokens, values, color=color(index), label=f"{run.name} {label}".strip(), **style)
            drawn = True
    return drawn


def _finish(ax: Axes, runs: Sequence[Run], title: str, ylabel: str) -> None:
    _token_axis(ax, runs)
    _mark_stages(ax, runs)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def loss_figure(runs: Sequence[Run], out: Path) -> Drawn:
    name = "training and validation loss"
    if not any(run.has("lm_loss") for run in runs):
        return Drawn(name, None, "no run logged lm_loss")
    figure, (lm, mtp) = _figure(1, 2)
    for ax, train_key, val_key, title in (
        (lm, "lm_loss", "val_loss", "LM loss (next token)"),
        (mtp, "mtp_loss", "val_mtp_loss", "MTP loss (mean over depths)"),
    ):
        _lines(ax, runs, train_key, "train")
        _lines(ax, runs, val_key, "validation", **VALIDATION_STYLE)
        _finish(ax, runs, title, "cross-entropy (nats per token)")
    return Drawn(name, _save(figure, out, "loss.png"))


SCHEDULE_PANELS = (
    ("lr", "learning rate", "LR"),
    ("global_batch_size", "global batch", "sequences per step"),
    ("mtp_loss_weight", "MTP loss weight", "weight"),
    ("moe_router_bias_update_rate", "expert-bias update rate", "rate per step"),
)


def schedule_figure(runs: Sequence[Run], out: Path) -> Drawn:
    name = "schedule"
    if not any(run.has("lr") for run in runs):
        return Drawn(name, None, "no run logged the schedule's values (lr)")
    figure, axes = _figure(2, 2)
    for ax, (key, title, ylabel) in zip(axes, SCHEDULE_PANELS):
        _lines(ax, runs, key, "", drawstyle="steps-pre")
        _finish(ax, runs, title, ylabel)
    return Drawn(name, _save(figure, out, "schedule.png"))


def throughput_figure(runs: Sequence[Run], out: Path) -> Drawn:
    name = "throughput"
    if not any(run.has("tokens_per_s") for run in runs):
        return Drawn(name, None, "no run logged tokens_per_s")
    figure, (speed, mfu) = _figure(1, 2)
    _lines(speed, runs, "tokens_per_s", "")
    _finish(speed, runs, "training throughput (whole job)", "tokens / s")
    if _lines(mfu, runs, "mfu", ""):
        mfu.yaxis.set_major_formatter(PercentFormatter(1.0))
        _finish(mfu, runs, "model FLOPs utilisation", "MFU (of the device peak)")
    else:
        mfu.set_axis_off()
        mfu.text(0.5, 0.5, "no MFU logged (older mimo)", ha="center", va="center", transform=mfu.transAxes)
    return Drawn(name, _save(figure, out, "throughput.png"))


def expert_load_figure(runs: Sequence[Run], out: Path) -> Drawn:
    name = "expert load"
    loaded = [run for run in runs if run.has("moe_tokens_per_expert")]
    if not loaded:
        return Drawn(name, None, "no run logged moe_tokens_per_expert (a model without MoE layers, or older mimo)")
    width = PANEL_SIZE[0] * max(MIN_HEATMAP_ROW, HEATMAP_WIDTH * len(loaded))
    figure = Figure(figsize=(width, PANEL_SIZE[1] * 2), dpi=DPI, layout="constrained")
    grid = figure.add_gridspec(2, len(loaded))
    for column, run in enumerate(loaded):
        _heatmap(figure, figure.add_subplot(grid[0, column]), run)
    violation = figure.add_subplot(grid[1, :])
    _lines(violation, runs, "moe_max_violation", "")
    _finish(violation, runs, "MaxVio per interval (max over MoE layers of max load / mean load - 1)", "MaxVio")
    return Drawn(name, _save(figure, out, "expert_load.png"))


def _heatmap(figure: Figure, ax: Axes, run: Run) -> None:
    row = next(row for row in reversed(run.rows) if row.get("moe_tokens_per_expert"))
    relative = [[count / (sum(layer) / len(layer) or 1) for count in layer] for layer in row["moe_tokens_per_expert"]]
    image = ax.imshow(relative, aspect="auto", cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=ax, label="tokens routed / mean over experts")
    ax.set_title(f"{run.name}: expert load, interval ending at step {row['step']}")
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer")
    layers = range(len(relative))
    ax.set_yticks(list(layers), [str(run.moe_layers[layer] if run.moe_layers else layer) for layer in layers])
    ax.xaxis.set_major_locator(MaxNLocator(MAX_TICKS * 2, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(MAX_TICKS * 2, integer=True))


def data_mixture_figure(runs: Sequence[Run], out: Path) -> Drawn:
    name = "data mixture"
    mixed = [run for run in runs if len({key for row in run.rows for key in row.get("samples_per_dataset", {})}) > 1]
    if not mixed:
        return Drawn(name, None, "every run reads one dataset (or logged no samples_per_dataset)")
    figure, axes = _figure(1, len(mixed))
    for ax, run in zip(axes, mixed):
        rows = [row for row in run.rows if row.get("samples_per_dataset")]
        names = sorted({key for row in rows for key in row["samples_per_dataset"]})
        tokens = [row["tokens"] for row in rows]
        totals = [sum(row["samples_per_dataset"].values()) or 1 for row in rows]
        shares = [[row["samples_per_dataset"].get(n, 0) / t for row, t in zip(rows, totals)] for n in names]
        ax.stackplot(tokens, shares, labels=names, step="pre")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylim(0, 1)
        _finish(ax, [run], f"{run.name}: samples per dataset, per logging interval", "share of the interval")
    return Drawn(name, _save(figure, out, "data_mixture.png"))


FIGURES: tuple[Callable[[Sequence[Run], Path], Drawn], ...] = (
    loss_figure,
    schedule_figure,
    throughput_figure,
    expert_load_figure,
    data_mixture_figure,
)


def draw_all(runs: Sequence[Run], out: Path) -> list[Drawn]:
    out.mkdir(parents=True, exist_ok=True)
    return [draw(runs, out) for draw in FIGURES]
