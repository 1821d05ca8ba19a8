"""FP8 GEMMs emulated with real FP8 rounding, on any device torch runs on.

Each operand is quantised the way an FP8 kernel sees it: split into blocks along its reduction dimension (the
plan's ``Fp8Scaling``), each block divided by a power-of-two scale chosen from its largest magnitude, rounded to
``torch.float8_e4m3fn`` (round to nearest even, saturating at +-448, subnormals down to 2^-9), then dequantised
and multiplied in FP32. The forward GEMM, the data-gradient GEMM and the weight-gradient GEMM each quantise their
own operands along their own reduction dimension, as Transformer Engine's blockwise and MXFP8 recipes do; only
the numerics are reproduced, not the speed (the products run in FP32).
"""

import math
from dataclasses import dataclass

import torch

from mimo.model.precision import Fp8Scaling

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
"""448: the largest finite E4M3 value; larger magnitudes saturate to it."""
SCALE_EXPONENT_LIMIT = 127
"""Scales stay within 2^-127 .. 2^127: the range of an E8M0 scale (and of an FP32 exponent)."""


@dataclass(frozen=True)
class BlockQuantized:
    """A 2-D tensor in FP8 with one dequantisation scale per block."""

    codes: torch.Tensor
    """The E4M3 values, shaped like the source tensor."""
    scales: torch.Tensor
    """FP32 powers of two, [ceil(rows / block rows), ceil(cols / block cols)]: source ~= codes * scale."""
    block: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        expanded = self.scales.repeat_interleave(self.block[0], 0).repeat_interleave(self.block[1], 1)
        return self.codes.to(torch.float32) * expanded[:rows, :cols]


def power_of_two_scales(amax: torch.Tensor) -> torch.Tensor:
    """The smallest power of two s with amax / s <= 448, for each block's largest magnitude (1 for empty blocks).

    Transformer Engine computes 448 / amax and keeps its exponent (drops the mantissa), which is the same power
    of two; E8M0 scales of the MX format are rounded up the same way, so nothing saturates.
    """
    multiplier = (E4M3_MAX / amax).clamp(max=torch.finfo(torch.float32).max)
    _, exponent = torch.frexp(multiplier)  # multiplier = m * 2^exponent, m in [0.5, 1)
    exponent = (exponent - 1).clamp(-SCALE_EXPONENT_LIMIT, SCALE_EXPONENT_LIMIT)
    scales = torch.pow(2.0, -exponent.to(torch.float32))
    return torch.where(amax > 0, scales, torch.ones_like(scales))


def to_e4m3(values: torch.Tensor) -> torch.Tensor:
    """Round to E4M3 (nearest even), saturating at +-448 as FP8 GEMM kernels do; the clamp states it rather than
    leaving overflow to the cast's own rule."""
    return values.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_blocks(tensor: torch.Tensor, block: tuple[int, int]) -> BlockQuantized:
    """Quantise a 2-D tensor with one scale per ``block`` (rows, cols); edge blocks may be partial."""
    if tensor.dim() != 2:
        raise ValueError(f"quantize_blocks takes a 2-D tensor, got shape {tuple(tensor.shape)}")
    rows, cols = tensor.shape
    block_rows, block_cols = block
    grid = (math.ceil(rows / block_rows), math.ceil(cols / block_cols))
    padded = torch.zeros(grid[0] * block_rows, grid[1] * block_cols, dtype=torch.float32, device=tensor.device)
    padded[:rows, :cols] = tensor
    tiles = padded.view(grid[0], block_rows, grid[1], block_cols)
    scales = power_of_two_scales(tiles.abs().amax(dim=(1, 3)))
    codes = to_e4m3(tiles / scales[:, None, :, None]).view_as(padded)[:rows, :cols]
    return BlockQuantized(codes=codes, scales=scales, block=block)


def fake_quantize(tensor: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``tensor`` as an FP8 GEMM sees it, back in FP32."""
    return quantize_blocks(tensor, block).dequantize()


class Fp8EmulatedMatmul(torch.autograd.Function):
    """y = x w^T for x [tokens, in] and w [out, in], every GEMM on FP8-rounded operands.

    forward: x in activation tiles along ``in``, w in weight blocks along ``in``;
    dgrad:   dy in gradient tiles along ``out``, w^T in weight blocks along ``out``;
    wgrad:   dy^T in gradient tiles along ``tokens``, x^T in activation tiles along ``tokens``.
    Results come back in the operands' dtypes (BF16 in an FP8 run); the products accumulate in FP32.
    """

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, weight: torch.Tensor, scaling: Fp8Scaling) -> torch.Tensor:
        ctx.save_for_backward(inputs, weight)
        ctx.scaling = scaling
        product = fake_quantize(inputs, scaling.activation_block) @ fake_quantize(weight, scaling.weight_block).t()
        return product.to(inputs.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        inputs, weight = ctx.saved_tensors
        scaling: Fp8Scaling = ctx.scaling
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad = fake_quantize(grad_output, scaling.gradient_block)
            grad_input = (grad @ fake_quantize(weight.t(), scaling.weight_block).t()).to(inputs.dtype)
        if ctx.needs_input_grad[1]:
            grad_t = fake_quantize(grad_output.t(), scaling.gradient_block)
            grad_weight = (grad_t @ fake_quantize(inputs.t(), scaling.activation_block).t()).to(weight.dtype)
        return grad_input, grad_weight, None


def fp8_emulated_linear(inputs: torch.Tensor, weight: torch.Tensor, scaling: Fp8Scaling) -> torch.Tensor:
    """``inputs @ weight.t()`` over the last dimension of ``inputs`` ([..., in] -> [..., out]), in emulated FP8."""
    flat = inputs.reshape(-1, inputs.shape[-1])
    return Fp8EmulatedMatmul.apply(flat, weight, scaling).view(*inputs.shape[:-1], weight.shape[0])
