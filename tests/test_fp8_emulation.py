"""Emulated FP8: the quantiser against closed forms, the emulated linear against an FP64 reference within FP8's
error bound, in forward, dgrad and wgrad, for both recipes and for sizes that are not multiples of the blocks."""

import math

import pytest
import torch

from mimo.model.fp8_emulation import fp8_emulated_linear, quantize_blocks, to_e4m3
from mimo.model.precision import BLOCKWISE, MXFP8

E4M3_LARGEST = 448.0
E4M3_HALF_STEP = 2.0**-4
"""Round to nearest with 3 mantissa bits: a normal value moves by at most 2^-4 of itself."""
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10
"""Subnormals are multiples of 2^-9 (times the block scale): they move by at most half of that."""
FP32_ACCUMULATION = 2.0**-24


def closed_form_scale(amax: float) -> float:
    """The smallest power of two s with amax / s <= 448; 1 for an all-zero block."""
    return 2.0 ** math.ceil(math.log2(amax / E4M3_LARGEST)) if amax > 0 else 1.0


def test_block_scales_are_the_smallest_power_of_two_that_fits_including_partial_blocks():
    amaxes = [[448.0, 449.0], [1.0, 0.0], [3e-5, 1e30]]
    x = torch.zeros(3, 200)  # 200 columns: one full 128-block and a partial one of 72
    for row, (first, second) in enumerate(amaxes):
        x[row, :128] = torch.linspace(-first, first / 3, 128)  # |min| is the block's largest magnitude
        x[row, 128:] = torch.linspace(-second, second / 7, 72)
    quantized = quantize_blocks(x, (1, 128))
    expected = torch.tensor([[closed_form_scale(a) for a in row] for row in amaxes])
    assert quantized.scales.shape == (3, 2)
    assert torch.equal(quantized.scales, expected)
    assert torch.all(quantized.codes.float().abs() <= E4M3_LARGEST)


def test_two_dimensional_blocks_cover_a_partial_grid():
    x = torch.zeros(200, 130)
    x[150, 129] = 5.0  # the only non-zero lands in the last (partial) block of both dimensions
    x[3, 3] = -0.25
    quantized = quantize_blocks(x, (128, 128))
    assert torch.equal(quantized.scales, torch.tensor([[closed_form_scale(0.25), 1.0], [1.0, closed_form_scale(5)]]))
    assert torch.equal(quantized.dequantize(), x)  # both are exact in E4M3 times their scale


@pytest.mark.parametrize(
    "value, expected",
    [
        (448.0, 448.0),
        (1.0625, 1.0),  # halfway between 1 and 1.125: ties to the even mantissa
        (1.1875, 1.25),
        (-300.0, -288.0),  # spacing 32 above 256: 300 is nearer 288 than 320
        (2.0**-9, 2.0**-9),  # the smallest subnormal survives
        (3 * 2.0**-10, 2.0**-8),  # halfway between the first two subnormals: ties to even
        (2.0**-11, 0.0),  # underflow
    ],
)
def test_codes_round_to_nearest_even_e4m3_with_subnormals(value, expected):
    x = torch.zeros(1, 128)
    x[0, 0], x[0, 1] = value, E4M3_LARGEST  # pins the block scale to 1
    assert quantize_blocks(x, (1, 128)).dequantize()[0, 0].item() == expected


def test_casting_saturates_at_the_largest_e4m3_value():
    assert to_e4m3(torch.tensor([1000.0, -1e6, 500.0, 460.0])).float().tolist() == [448.0, -448.0, 448.0, 448.0]


def test_mxfp8_scales_are_e8m0():
    x = torch.randn(64, 100) * torch.logspace(-30, 30, 100)
    scales = quantize_blocks(x, MXFP8.activation_block).scales
    exponents = torch.log2(scales)
    assert scales.shape == (64, 4)
    assert torch.equal(exponents, exponents.round()) and exponents.abs().max() <= 127


def spread(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Random values whose magnitudes span ~6 decades across rows and across columns, so quantising along the
    wrong dimension (one scale for very different magnitudes) flushes small values and breaks the bound."""
    row_scale = 10.0 ** (torch.rand(rows, 1, generator=generator, dtype=torch.float64) * 6 - 3)
    col_scale = 10.0 ** (torch.rand(1, cols, generator=generator, dtype=torch.float64) * 6 - 3)
    return torch.randn(rows, cols, generator=generator, dtype=torch.float64) * row_scale * col_scale


def element_error_bound(operand: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """|x - fp8(x)| per element, written plainly: the block's closed-form scale s, then max(2^-4 |x|, 2^-10 s)."""
    rows, cols = operand.shape
    bound = torch.empty_like(operand)
    for r in range(0, rows, block[0]):
        for c in range(0, cols, block[1]):
            tile = operand[r : r + block[0], c : c + block[1]]
            scale = closed_form_scale(tile.abs().max().item())
            bound[r : r + block[0], c : c + block[1]] = torch.clamp(
                E4M3_HALF_STEP * tile.abs(), min=E4M3_SUBNORMAL_HALF_STEP * scale
            )
    return bound


def gemm_error_bound(a: torch.Tensor, a_block, b: torch.Tensor, b_block) -> torch.Tensor:
    """Bound on |fp8(a) fp8(b)^T - a b^T| for a [m, k], b [n, k], each quantised along k with its block."""
    error_a, error_b = element_error_bound(a, a_block), element_error_bound(b, b_block)
    rounding = a.abs() @ error_b.t() + error_a @ b.abs().t() + error_a @ error_b.t()
    accumulation = a.shape[1] * FP32_ACCUMULATION * ((a.abs() + error_a) @ (b.abs() + error_b).t())
    return rounding + accumulation


@pytest.mark.parametrize("scaling", [BLOCKWISE, MXFP8], ids=lambda s: s.recipe)
def test_emulated_linear_is_within_the_fp8_error_bound_of_fp64_in_forward_dgrad_and_wgrad(scaling):
    generator = torch.Generator().manual_seed(0)
    tokens, fan_in, fan_out = 150, 200, 72  # none a multiple of 128, two not of 32
    x, w = spread(tokens, fan_in, generator), spread(fan_out, fan_in, generator)
    grad = spread(tokens, fan_out, generator)
    inputs = x.float().view(3, 50, fan_in).requires_grad_()
    weight = w.float().requires_grad_()
    out = fp8_emulated_linear(inputs, weight, scaling)
    out.backward(grad.float().view(3, 50, fan_out))

    products = {
        "forward": (
            out.detach().view(tokens, fan_out),
            x @ w.t(),
            (x, scaling.activation_block, w, scaling.weight_block),
        ),
        "dgrad": (
            inputs.grad.view(tokens, fan_in),
            grad @ w,
            (grad, scaling.gradient_block, w.t(), scaling.weight_block),
        ),
        "wgrad": (weight.grad, grad.t() @ x, (grad.t(), scaling.gradient_block, x.t(), scaling.activation_block)),
    }
    for name, (emulated, exact, operands) in products.items():
        error = (emulated.double() - exact).abs()
        bound = gemm_error_bound(*operands)
        assert torch.all(error <= bound), f"{name}: {(error / bound).max():.2f} x the bound"
        assert error.max() > 1e-3 * exact.abs().max(), f"{name} was not rounded to FP8"
