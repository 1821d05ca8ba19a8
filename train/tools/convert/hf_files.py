"""Hugging Face MiMo-V2-Flash checkpoint files read tensor by tensor (FP8 block-quantised weights dequantised on
the way); ``hf_writer`` writes them.

Reading never loads a whole file: the headers give every tensor's name, shape and dtype, and a tensor's bytes are
read only when it is asked for, so each rank of a converter touches only the tensors it holds.
"""

import json
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mimo.model.hf.mapping import QUANT_SCALE_SUFFIX
from mimo.recipes.errors import MimoError

TOKENIZER_KEY = "data.tokenizer"
"""The run's tokenizer: import sets it to the HF directory's own tokenizer (unless given), export writes it."""
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_FP8_BLOCK = (128, 128)
"""Weight block of the released FP8 checkpoint (DeepSeek-V3 style) when config.json does not name one."""
FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
"""safetensors dtype names of the FP8 formats that come with a block scale."""


class ConvertError(MimoError, ValueError):
    """A checkpoint directory that cannot be converted; the message names the files or tensors and the fix."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str
    """safetensors' dtype name (F32, BF16, F8_E4M3, ...)."""


def fp8_block(hf_config) -> tuple[int, int]:
    """The weight block of an FP8 checkpoint's ``quantization_config`` (128x128 when it names none)."""
    quant = getattr(hf_config, "quantization_config", None) or {}
    block = quant.get("weight_block_size") if isinstance(quant, dict) else None
    return tuple(block) if block else DEFAULT_FP8_BLOCK


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP32 weight of a block-quantised one: every [block] tile of ``weight`` times its entry of ``scale_inv``
    (edge tiles are partial: the scale grid is ceil(rows / block[0]) x ceil(cols / block[1]))."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale_inv.shape) != grid:
        raise ConvertError(
            f"scale of shape {tuple(scale_inv.shape)} for a {rows}x{cols} weight; {block[0]}x{block[1]} blocks need"
            f" {grid}"
        )
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


class HFCheckpoint:
    """The safetensors files of one checkpoint directory (single file or sharded with an index)."""

    def __init__(self, directory: Path, block: tuple[int, int] = DEFAULT_FP8_BLOCK):
        self.directory = Path(directory)
        self.block = block
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._files():
            handle = self._handle(file)
            for name in handle.keys():
                part = handle.get_slice(name)
                self.tensors[name] = TensorInfo(file, tuple(part.get_shape()), part.get_dtype())

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _files(self) -> list[Path]:
        index = self.directory / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as err:
                raise ConvertError(f"cannot read the weight map of {index}: {err}") from err
            files = sorted({self.directory / name for name in weight_map.values()})
        else:
            files = sorted(self.directory.glob("*.safetensors"))
        missing = [str(file) for file in files if not file.exists()]
        if missing or not files:
            raise ConvertError(
                f"{self.directory}: {'missing shard files ' + ', '.join(missing) if missing else 'no *.safetensors'}"
                "; download the complete checkpoint"
            )
        return files

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
        return self._handles[file]

    def is_quantized(self, name: str) -> bool:
        return self.tensors[name].dtype in FP8_DTYPES

    def weights(self) -> dict[str, tuple[int, ...]]:
        """Shape of every model tensor (FP8 scales are not model tensors: they belong to their weight)."""
        return {name: info.shape for name, info in self.tensors.items() if not name.endswith(QUANT_SCALE_SUFFIX)}

    def quantization_problems(self) -> list[str]:
        """FP8 weights without a scale, scales without an FP8 weight, scales of the wrong grid."""
        problems = []
        for name, info in self.tensors.items():
            if name.endswith(QUANT_SCALE_SUFFIX):
                weight = self.tensors.get(name[: -len(QUANT_SCALE_SUFFIX)])
                if weight is None or weight.dtype not in FP8_DTYPES:
                    problems.append(f"{name}: a scale without an FP8 weight")
                    continue
                grid = tuple(math.ceil(size / block) for size, block in zip(weight.shape, self.block))
                if info.shape != grid:
                    problems.append(f"{name}: shape {info.shape}, expected {grid} for {self.block} blocks")
            elif info.dtype in FP8_DTYPES and name + QUANT_SCALE_SUFFIX not in self.tensors:
                problems.append(f"{name}: {info.dtype} weight without {name}{QUANT_SCALE_SUFFIX}")
        return problems

    def read(self, name: str) -> torch.Tensor:
        """One tensor as stored, or in FP32 when it is FP8-quantised."""
        tensor = self._handle(self.tensors[name].file).get_tensor(name)
        if not self.is_quantized(name):
            return tensor
        scale_name = name + QUANT_SCALE_SUFFIX
        return dequantize_fp8(tensor, self._handle(self.tensors[scale_name].file).get_tensor(scale_name), self.block)
