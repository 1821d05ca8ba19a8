"""The precision plan: the report's FP8 recipe per GEMM, its log block, and that the spec builder asks for exactly
the plan, on Transformer Engine (stand-in classes: TE is never imported) and on the local backend (a real model)."""

import dataclasses
import sys

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayerSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from mimo.model.builder import build_model
from mimo.model.config import ModelConfigError, PrecisionConfig
from mimo.model.fp8_modules import Fp8EmulatedColumnParallelLinear, Fp8EmulatedRowParallelLinear
from mimo.model.precision import (
    BLOCKWISE,
    MXFP8,
    Fp8Implementation,
    Gemm,
    describe_precision_plan,
    precision_plan,
)
from mimo.model.specs import BackendModules, decoder_layer_specs, mtp_layer_spec
from mimo.parallel.config import ParallelConfig
from mimo.recipes import load_config

FP8 = {Gemm.QKV, Gemm.DENSE_FFN, Gemm.EXPERT_FFN, Gemm.MTP_PROJ}
BF16 = {Gemm.OUT_PROJ, Gemm.ATTENTION, Gemm.EMBEDDING, Gemm.HEAD}
SEQ = 32
BATCH = 2


def fp8(recipe: str, backend: str = "auto") -> PrecisionConfig:
    return PrecisionConfig(dtype="bf16", fp8=recipe, fp8_backend=backend)


@pytest.mark.parametrize("recipe, scaling", [("blockwise", BLOCKWISE), ("mxfp8", MXFP8)])
def test_the_plan_is_the_reports_recipe(recipe, scaling):
    plan = precision_plan(fp8(recipe), use_te=False)
    by_compute = {compute: {g for g, c in plan.gemms.items() if c.compute == compute} for compute in ("FP8", "BF16")}
    assert by_compute == {"FP8": FP8, "BF16": BF16}
    assert plan.gemms[Gemm.ROUTER].compute == "FP32"
    assert all(plan.scaling(gemm) == scaling for gemm in FP8)
    assert all(plan.scaling(gemm) is None for gemm in BF16 | {Gemm.ROUTER})


def test_the_recipes_block_shapes():
    assert (BLOCKWISE.activation_block, BLOCKWISE.gradient_block, BLOCKWISE.weight_block) == ((1, 128),) * 2 + (
        (128, 128),
    )
    assert (MXFP8.activation_block, MXFP8.gradient_block, MXFP8.weight_block) == ((1, 32),) * 3
    assert MXFP8.scale_format == "E8M0" and BLOCKWISE.element_format == MXFP8.element_format == "E4M3"


def test_without_fp8_nothing_is_fp8_and_the_router_is_fp32():
    plan = precision_plan(PrecisionConfig(dtype="bf16"), use_te=True)
    assert plan.fp8 is None and plan.implementation is None and not plan.te_fp8
    assert {c.compute for g, c in plan.gemms.items() if g is not Gemm.ROUTER} == {"BF16"}
    assert plan.gemms[Gemm.ROUTER].compute == "FP32"


@pytest.mark.parametrize(
    "backend, use_te, expected",
    [
        ("auto", True, Fp8Implementation.TE),
        ("auto", False, Fp8Implementation.EMULATED),
        ("emulated", True, Fp8Implementation.EMULATED),
        ("te", True, Fp8Implementation.TE),
    ],
)
def test_who_runs_the_fp8_gemms(backend, use_te, expected):
    assert precision_plan(fp8("blockwise", backend), use_te=use_te).implementation is expected


@pytest.mark.parametrize(
    "precision, message",
    [
        (fp8("blockwise", "te"), "precision.fp8_backend=te needs Transformer Engine"),
        (fp8("blockwise", "cuda"), "precision.fp8_backend='cuda' is not one of"),
        (PrecisionConfig(dtype="fp32", fp8="mxfp8"), "needs precision.dtype=bf16"),
    ],
)
def test_impossible_plans_are_refused_with_the_key(precision, message):
    with pytest.raises(ModelConfigError, match=message):
        precision_plan(precision, use_te=False)


def test_the_log_block_says_what_is_fp8_what_is_bf16_and_why():
    text = describe_precision_plan(precision_plan(fp8("blockwise"), use_te=False))
    lines = text.splitlines()
    assert lines[0].startswith("precision: BF16 parameters and activations; FP8 blockwise (Hopper) emulated")
    assert "1x128 tiles for activations, 1x128 for gradients, 128x128 blocks for weights" in lines[1]
    fp8_line = next(line for line in lines if line.lstrip().startswith("FP8:"))
    bf16_line = next(line for line in lines if line.lstrip().startswith("BF16:"))
    fp32_line = next(line for line in lines if line.lstrip().startswith("FP32:"))
    assert all(gemm.value in fp8_line for gemm in FP8) and not any(gemm.value in fp8_line for gemm in BF16)
    assert "attention output projection, embedding, output head (report)" in bf16_line
    assert "router" in fp32_line and "moe_router_dtype=fp32" in fp32_line
    assert len(lines) == 5


# ---------------------------------------------------------------- the spec builder, with stand-ins for TE's modules


class StandInColumn:
    pass


class StandInRow:
    pass


class StandInGroupedColumn:
    pass


class StandInGroupedRow:
    pass


class StandInGroupedExperts:
    pass


class StandInProvider:
    """Answers like megatron's TESpecProvider, with classes that need no Transformer Engine."""

    def column_parallel_linear(self) -> type:
        return StandInColumn

    def row_parallel_linear(self) -> type:
        return StandInRow

    def activation_func(self) -> None:
        return None

    def grouped_mlp_modules(self, grouped: bool, legacy: bool):
        if grouped:
            return StandInGroupedExperts, MLPSubmodules(linear_fc1=StandInGroupedColumn, linear_fc2=StandInGroupedRow)
        return SequentialMLP, MLPSubmodules(linear_fc1=StandInColumn, linear_fc2=StandInRow)


def linear_slots(model_cfg, backend: BackendModules) -> dict[str, object]:
    """What every decoder layer and the MTP block ask for, by GEMM position; one answer per position, checked to
    be the same in every layer that has it."""
    answers: dict[str, list] = {}
    for layer_spec in [*decoder_layer_specs(model_cfg, backend), mtp_layer_spec(model_cfg, backend)]:
        if isinstance(layer_spec.submodules, MultiTokenPredictionLayerSubmodules):
            answers.setdefault("mtp eh_proj", []).append(layer_spec.submodules.eh_proj)
            layer_spec = layer_spec.submodules.transformer_layer
        attention = layer_spec.submodules.self_attention.submodules
        answers.setdefault("qkv", []).append(attention.linear_qkv)
        answers.setdefault("proj", []).append(attention.linear_proj)
        mlp = layer_spec.submodules.mlp
        if mlp.module is MoELayer:
            experts = mlp.submodules.experts
            answers.setdefault("experts module", []).append(experts.module)
            answers.setdefault("expert fc1", []).append(experts.submodules.linear_fc1)
            answers.setdefault("expert fc2", []).append(experts.submodules.linear_fc2)
        else:
            answers.setdefault("dense fc1", []).append(mlp.submodules.linear_fc1)
            answers.setdefault("dense fc2", []).append(mlp.submodules.linear_fc2)
    for position, values in answers.items():
        assert all(value == values[0] for value in values), f"{position} differs between layers: {values}"
    return {position: values[0] for position, values in answers.items()}


def stand_in_backend(plan) -> BackendModules:
    return BackendModules(provider=StandInProvider(), norm=torch.nn.Identity, core_attention=object, plan=plan)


def test_te_fp8_spec_asks_for_te_modules_and_keeps_only_the_output_projection_out_of_fp8():
    model_cfg = dataclasses.replace(load_config().model, moe_grouped_gemm=True)
    slots = linear_slots(model_cfg, stand_in_backend(precision_plan(fp8("blockwise"), use_te=True)))
    proj = slots.pop("proj")
    assert issubclass(proj, StandInRow) and proj is not StandInRow and proj.fp8_disabled
    assert slots == {
        "mtp eh_proj": StandInColumn,
        "qkv": StandInColumn,
        "dense fc1": StandInColumn,
        "dense fc2": StandInRow,
        "experts module": StandInGroupedExperts,
        "expert fc1": StandInGroupedColumn,
        "expert fc2": StandInGroupedRow,
    }
    assert "transformer_engine" not in sys.modules


def test_te_bf16_spec_asks_for_plain_te_modules():
    slots = linear_slots(load_config().model, stand_in_backend(precision_plan(PrecisionConfig("bf16"), use_te=True)))
    assert set(slots.values()) == {StandInColumn, StandInRow, SequentialMLP}


def test_emulated_fp8_spec_asks_for_emulated_linears_with_the_plans_scaling_beside_te_modules():
    slots = linear_slots(load_config().model, stand_in_backend(precision_plan(fp8("mxfp8", "emulated"), use_te=True)))
    emulated = {
        "mtp eh_proj": Fp8EmulatedColumnParallelLinear,
        "qkv": Fp8EmulatedColumnParallelLinear,
        "dense fc1": Fp8EmulatedColumnParallelLinear,
        "dense fc2": Fp8EmulatedRowParallelLinear,
        "expert fc1": Fp8EmulatedColumnParallelLinear,
        "expert fc2": Fp8EmulatedRowParallelLinear,
    }
    for slot, module in emulated.items():
        assert slots[slot] == ModuleSpec(module=module, params={"fp8": MXFP8}), slot
    assert slots["proj"] is StandInRow and slots["experts module"] is SequentialMLP


def test_emulated_fp8_refuses_grouped_expert_gemms():
    model_cfg = dataclasses.replace(load_config().model, moe_grouped_gemm=True)
    with pytest.raises(ModelConfigError, match="moe_grouped_gemm=false"):
        linear_slots(model_cfg, stand_in_backend(precision_plan(fp8("blockwise"), use_te=False)))


# ---------------------------------------------------------------- the local backend builds what the plan says


@pytest.fixture(scope="module")
def tiny():
    return load_config().model


def test_the_built_model_runs_every_gemm_as_planned(single_rank, tiny):
    model = build_model(tiny, ParallelConfig(), fp8("blockwise"), seq_length=SEQ, seed=0)[0]
    assert model.config.fp8 is None, "emulated FP8 must not open Transformer Engine's autocast"
    assert model.config.moe_router_dtype == "fp32"
    roles = {
        "linear_qkv": Fp8EmulatedColumnParallelLinear,
        "linear_proj": RowParallelLinear,
        "linear_fc1": Fp8EmulatedColumnParallelLinear,
        "linear_fc2": Fp8EmulatedRowParallelLinear,
        "eh_proj": Fp8EmulatedColumnParallelLinear,
        "output_layer": ColumnParallelLinear,
    }
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, ColumnParallelLinear | RowParallelLinear)
    }
    for name, module in linears.items():
        assert type(module) is roles[name.rsplit(".", 1)[-1]], name
    assert {name.rsplit(".", 1)[-1] for name in linears} == set(roles)
    emulated = {
        name: module
        for name, module in linears.items()
        if isinstance(module, Fp8EmulatedColumnParallelLinear | Fp8EmulatedRowParallelLinear)
    }
    assert all(module.fp8 == BLOCKWISE for module in emulated.values())
    assert isinstance(model.embedding.word_embeddings, VocabParallelEmbedding)
    ids = torch.randint(0, tiny.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    model(ids, None, None, labels=ids).float().mean().backward()
    dense = [module for name, module in emulated.items() if "experts" not in name]  # every token passes these
    assert dense and all(module.weight.grad is not None and module.weight.grad.isfinite().all() for module in dense)
