"""The plan as a readable table (and as JSON)."""

from collections.abc import Sequence
from dataclasses import asdict

from mimo.train.tools.plan.activations import describe_recompute
from mimo.train.tools.plan.planning import Plan
from mimo.train.tools.plan.settings import GIB


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _tokens(value: float) -> str:
    for suffix, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if value >= size:
            return f"{value / size:.4g}{suffix}"
    return f"{value:.0f}"


def _count(value: float) -> str:
    """Parameter counts as the report writes them: 309.11B, 1.23M."""
    for suffix, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if value >= size:
            return f"{value / size:.2f}{suffix}"
    return f"{value:.0f}"


def _layers(layers: Sequence[int]) -> str:
    if not layers:
        return "-"
    runs, start = [], layers[0]
    for previous, current in zip(layers, list(layers[1:]) + [None]):
        if current != previous + 1:
            runs.append(f"{start}" if start == previous else f"{start}-{previous}")
            start = current
    return ",".join(runs)


MEMORY_ROWS = (
    ("weights", "weights"),
    ("gradients", "gradients (fp32)"),
    ("optimizer", "optimizer states"),
    ("activations", "activations"),
    ("moe_dispatch", "MoE dispatch buffers"),
    ("logits", "logits and loss"),
    ("reserved", "reserved"),
)


def format_plan(plan: Plan) -> str:
    lay, gpu = plan.layout, plan.gpu
    lines = [
        f"mimo-plan: {plan.recipe} {' '.join(plan.overrides)}".rstrip(),
        f"  on {plan.world_size} x {gpu.name} ({gpu.memory_gib:.1f} GiB, {gpu.bf16_tflops:g} dense BF16 TFLOP/s)",
        f"layout     tp {lay.tp}  pp {lay.pp}  vpp {lay.vpp or '-'}  cp {lay.cp}  ep {lay.ep}  etp {lay.etp}"
        f"  |  dp {lay.dp}  expert-dp {lay.expert_dp}  |  sequence parallel {'on' if lay.sequence_parallel else 'off'}",
        f"           {lay.num_microbatches} micro-batches per rank per step at the full batch",
        f"recompute  {describe_recompute(plan.recompute)}",
        f"model      {_count(plan.params.total)} parameters ({_count(plan.params.mtp)} of them MTP),"
        f" {_count(plan.params.active)} active per token",
        "",
    ]
    stages = plan.memory.stages
    width = max(7, *(len(_layers(s.layers)) + 2 for s in stages))

    def row(label: str, cells: Sequence[str]) -> str:
        return f"{label:<28}" + "".join(f"{cell:>{width}}" for cell in cells)

    lines += [
        row("memory per GPU (GiB)", []) + "  by pipeline stage",
        row("  pipeline stage", [str(s.stage) for s in stages]),
        row("  decoder layers", [_layers(s.layers) for s in stages]),
        row("  micro-batches in flight", [str(s.in_flight) for s in stages]),
    ]
    for key, label in MEMORY_ROWS:
        lines.append(row("  " + label, [_gib(getattr(s, key)) for s in stages]))
    lines.append(row("  total", [_gib(s.total) for s in stages]))
    lines.append("")
    flops = plan.flops
    lines += [
        f"compute    forward {flops.forward:.3e} FLOPs/token: attention projections {flops.attention_projections:.3e},"
        f" attention scores {flops.attention_scores:.3e} (GA causal, SWA within the window),",
        f"           dense FFN {flops.dense_mlp:.3e}, experts {flops.experts:.3e}, routers {flops.routers:.3e},"
        f" LM head {flops.lm_head:.3e}, MTP {flops.mtp + flops.mtp_attention_scores:.3e}",
        f"           training (forward + backward, recomputation not counted) {flops.training:.3e} FLOPs/token",
        f"           at MFU {plan.mfu:g}: {plan.tokens_per_s:,.0f} tokens/s, {plan.step_seconds:.1f} s per step of"
        f" {plan.step_tokens:,} tokens",
        "",
        f"{'training stage':<16}{'tokens':>20}{'seq':>10}{'steps':>12}{'tokens/s':>14}{'days':>10}  recipe",
    ]
    for stage in plan.stages:
        span = f"{_tokens(stage.start_tokens)}-{_tokens(stage.end_tokens)}"
        steps = f"{stage.steps:,}" if stage.steps is not None else "?"
        marker = "  <- this run" if stage.current else ""
        lines.append(
            f"{stage.name:<16}{span:>20}{stage.seq_length:>10,}{steps:>12}{stage.tokens_per_s:>14,.0f}"
            f"{stage.days:>10.1f}  {stage.recipe or plan.recipe}{marker}"
        )
    lines += ["", f"{'communication per step and GPU':<40}{'group':>6}{'GiB':>10}{'off-node':>10}{'seconds':>10}"]
    for item in plan.traffic:
        lines.append(
            f"  {item.kind:<38}{item.group_size:>6}{_gib(item.bytes):>10}"
            f"{item.between_nodes:>10.0%}{item.seconds:>10.1f}"
        )
    if not plan.traffic:
        lines.append("  none (a single rank)")
    lines += ["  (seconds: at the link bandwidth with no overlap; compare with the step time above)", ""]
    lines += _verdict(plan)
    return "\n".join(lines)


def _verdict(plan: Plan) -> list[str]:
    peak, capacity = plan.memory.peak, plan.memory.capacity
    lines = []
    if plan.memory.fits:
        return lines + [
            f"fits: the fullest stage ({peak.stage}) needs {_gib(peak.total)} GiB,"
            f" {_gib(capacity - peak.total)} GiB to spare on a {plan.gpu.name}"
        ]
    lines += [
        f"DOES NOT FIT: stage {peak.stage} needs {_gib(peak.total)} GiB, {_gib(peak.total - capacity)} GiB more than"
        f" the {_gib(capacity)} GiB of a {plan.gpu.name} ({_gib(peak.reserved)} GiB of it kept in reserve).",
    ]
    largest = sorted(MEMORY_ROWS[:-1], key=lambda row: getattr(peak, row[0]), reverse=True)[:2]
    lines.append("  largest parts: " + ", ".join(f"{label} {_gib(getattr(peak, key))} GiB" for key, label in largest))
    fitting = [s for s in plan.suggestions if s.fits]
    others = [s for s in plan.suggestions if not s.fits]
    if fitting:
        lines.append("  changes that make it fit (peak GiB):")
        lines += [f"    {s.change}  ->  {_gib(s.peak_bytes)}" for s in fitting]
    if others:
        lines.append(
            "  changes that help but do not fit alone (peak GiB): "
            + "; ".join(f"{s.change} -> {_gib(s.peak_bytes)}" for s in others)
        )
    if not plan.suggestions:
        lines.append("  no single change gives a valid layout; use more GPUs or a GPU with more memory")
    return lines


def plan_to_json(plan: Plan) -> dict[str, object]:
    data = asdict(plan)
    data["step_seconds"] = plan.step_seconds
    data["flops"].update(forward=plan.flops.forward, training=plan.flops.training)
    data["params"].update(total=plan.params.total, active=plan.params.active)
    for stage, raw in zip(plan.memory.stages, data["memory"]["stages"]):
        raw["total"] = stage.total
    data["memory"].update(peak_stage=plan.memory.peak.stage, peak_bytes=plan.memory.peak.total, fits=plan.memory.fits)
    data["runs"] = plan.runs
    return data
