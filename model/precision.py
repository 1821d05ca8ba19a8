"""The precision of every GEMM of a MiMo model, decided once from ``precision.*``.

MiMo-V2-Flash trains in FP8 "similar to DeepSeek-V3" (E4M3 operands, fine-grained block scales, FP32
accumulation), with the report's exceptions: the attention output projection, the embedding and the output head
stay in BF16 and the router in FP32. The plan is that recipe written down as data: the spec builder
(``mimo.model.specs``) picks every linear module from it, the FP8 emulation (``mimo.model.fp8_emulation``) reads
its block shapes, and the start-up log prints it (``describe_precision_plan``). No torch here: the plan is pure
data, so the rules can be read and tested on their own.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from mimo.model.config import ModelConfigError, PrecisionConfig


class Gemm(str, Enum):
    """Every matrix product of the model, by role; the values are the names the log prints."""

    QKV = "QKV projection"
    OUT_PROJ = "attention output projection"
    ATTENTION = "attention core (QK^T, PV)"
    DENSE_FFN = "dense FFN"
    EXPERT_FFN = "expert FFNs"
    ROUTER = "router"
    MTP_PROJ = "MTP projection (eh_proj)"
    EMBEDDING = "embedding"
    HEAD = "output head"


class Fp8Implementation(str, Enum):
    TE = "te"
    """Transformer Engine's FP8 kernels under its FP8 autocast (GPU)."""
    EMULATED = "emulated"
    """mimo's emulation: operands rounded to E4M3 with the plan's block scales, multiplied in FP32."""


@dataclass(frozen=True)
class Fp8Scaling:
    """How the operands of an FP8 GEMM are quantised.

    Every block is written (rows, cols) of the operand as the GEMM consumes it, with the reduction dimension
    last: activations [tokens, in] in the forward GEMM and [in, tokens] in the weight-gradient GEMM, gradients
    [tokens, out] in the data-gradient GEMM and [out, tokens] in the weight-gradient GEMM, weights [out, in] forward
    and [in, out] for the data gradient. Scales are powers of two (Transformer Engine's default for both recipes),
    rounded up so that no element saturates.
    """

    recipe: str
    hardware: str
    activation_block: tuple[int, int]
    gradient_block: tuple[int, int]
    weight_block: tuple[int, int]
    scale_format: str
    element_format: str = "E4M3"
    accumulation: str = "FP32"

    def summary(self) -> str:
        return (
            f"{self.element_format} operands, {_block(self.activation_block)} tiles for activations,"
            f" {_block(self.gradient_block)} for gradients, {_block(self.weight_block)} blocks for weights,"
            f" {self.scale_format} scales, {self.accumulation} accumulation"
        )


BLOCKWISE = Fp8Scaling(
    recipe="blockwise",
    hardware="Hopper",
    activation_block=(1, 128),
    gradient_block=(1, 128),
    weight_block=(128, 128),
    scale_format="FP32 power-of-two",
)
"""DeepSeek-V3's recipe, Transformer Engine's Float8BlockScaling."""

MXFP8 = Fp8Scaling(
    recipe="mxfp8",
    hardware="Blackwell",
    activation_block=(1, 32),
    gradient_block=(1, 32),
    weight_block=(1, 32),
    scale_format="E8M0",
)
"""The OCP microscaling format, Transformer Engine's MXFP8BlockScaling."""

FP8_SCALINGS = {scaling.recipe: scaling for scaling in (BLOCKWISE, MXFP8)}

FP8_GEMMS = (Gemm.QKV, Gemm.DENSE_FFN, Gemm.EXPERT_FFN, Gemm.MTP_PROJ)
"""What runs in FP8 in an FP8 run: the Q/K/V projections and every FFN GEMM; the MTP block's projection as in
DeepSeek-V3, whose FP8 framework covers the MTP modules' linears."""

HIGH_PRECISION_REASONS = {
    Gemm.OUT_PROJ: "report",
    Gemm.ATTENTION: "DeepSeek-V3's recipe",
    Gemm.EMBEDDING: "report",
    Gemm.HEAD: "report",
}
"""The exceptions to FP8 in an FP8 run, and why."""

ROUTER_REASON = "report; moe_router_dtype=fp32: logits, sigmoid and top-k in FP32"


@dataclass(frozen=True)
class GemmPrecision:
    compute: str
    """FP8 | BF16 | FP32: the precision of the GEMM's operands."""
    reason: str
    fp8: Fp8Scaling | None = None


@dataclass(frozen=True)
class PrecisionPlan:
    dtype: str
    """precision.dtype: parameters and activations, fp32 | bf16."""
    fp8: Fp8Scaling | None
    implementation: Fp8Implementation | None
    """Who runs the FP8 GEMMs; None without FP8."""
    gemms: Mapping[Gemm, GemmPrecision]

    def scaling(self, gemm: Gemm) -> Fp8Scaling | None:
        """The FP8 scaling of ``gemm``, or None when it runs in higher precision."""
        return self.gemms[gemm].fp8

    @property
    def te_fp8(self) -> bool:
        """Whether Transformer Engine's FP8 autocast is on (megatron's TransformerConfig.fp8)."""
        return self.implementation is Fp8Implementation.TE

    @property
    def emulated(self) -> bool:
        return self.implementation is Fp8Implementation.EMULATED


def precision_plan(precision: PrecisionConfig, use_te: bool) -> PrecisionPlan:
    """The plan of a run on Transformer Engine (``use_te``) or on mimo's local modules."""
    precision.validate()
    scaling = FP8_SCALINGS[precision.fp8] if precision.fp8 else None
    implementation = _implementation(precision, use_te) if scaling else None
    high = precision.dtype.upper()
    gemms = {}
    for gemm in Gemm:
        if gemm is Gemm.ROUTER:
            gemms[gemm] = GemmPrecision("FP32", ROUTER_REASON)
        elif scaling is not None and gemm in FP8_GEMMS:
            gemms[gemm] = GemmPrecision("FP8", f"precision.fp8={scaling.recipe}", scaling)
        elif scaling is not None:
            gemms[gemm] = GemmPrecision(high, HIGH_PRECISION_REASONS[gemm])
        else:
            gemms[gemm] = GemmPrecision(high, f"precision.dtype={precision.dtype}")
    return PrecisionPlan(dtype=precision.dtype, fp8=scaling, implementation=implementation, gemms=gemms)


def _implementation(precision: PrecisionConfig, use_te: bool) -> Fp8Implementation:
    backend = precision.fp8_backend
    if backend == "auto":
        return Fp8Implementation.TE if use_te else Fp8Implementation.EMULATED
    if backend == Fp8Implementation.TE.value and not use_te:
        raise ModelConfigError(
            "precision.fp8_backend=te needs Transformer Engine on a GPU and this run uses mimo's local modules;"
            " set precision.fp8_backend=emulated (or auto) to emulate FP8, or install transformer-engine"
        )
    return Fp8Implementation(backend)


IMPLEMENTATION_NOTES = {
    Fp8Implementation.TE: "on Transformer Engine's FP8 kernels under megatron's FP8 autocast, which the BF16"
    " linears opt out of",
    Fp8Implementation.EMULATED: "emulated: each operand rounded to E4M3 with these scales, then multiplied in FP32"
    " (forward, dgrad and wgrad)",
}


def describe_precision_plan(plan: PrecisionPlan) -> str:
    """The start-up log's block: what runs in FP8 and how, what stays in BF16/FP32 and why."""
    lines = [f"precision: {plan.dtype.upper()} parameters and activations"]
    if plan.fp8 is None:
        lines[0] += ", no FP8 (precision.fp8=null)"
    else:
        lines[0] += f"; FP8 {plan.fp8.recipe} ({plan.fp8.hardware}) {IMPLEMENTATION_NOTES[plan.implementation]}"
        lines.append(f"  FP8 scaling: {plan.fp8.summary()}")
    for compute in ("FP8", "BF16", "FP32"):
        by_reason: dict[str, list[str]] = {}
        for gemm, choice in plan.gemms.items():
            if choice.compute == compute:
                by_reason.setdefault(choice.reason, []).append(gemm.value)
        if by_reason:
            groups = "; ".join(f"{', '.join(names)} ({reason})" for reason, names in by_reason.items())
            lines.append(f"  {compute + ':':6}{groups}")
    return "\n".join(lines)


def _block(block: tuple[int, int]) -> str:
    return f"{block[0]}x{block[1]}"
