"""Hugging Face MiMo-V2-Flash checkpoint directories: config.json in either spelling, safetensors read tensor by
tensor (FP8 block-quantised weights dequantised on the way), sharded safetensors written back.

Reading never loads a whole file: the headers give every tensor's name, shape and dtype, and a tensor's bytes are
read only when it is asked for, so each rank of a converter touches only the tensors it holds.
"""

import json
import math
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from mimo.model.config import AttentionType, ModelConfig
from mimo.model.hf_mapping import HUB_MTP_PRE_MLP_NORM, QUANT_SCALE_SUFFIX

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SAFETENSORS_METADATA = {"format": "pt"}
"""transformers refuses safetensors files whose metadata does not say they hold PyTorch tensors."""
DEFAULT_FP8_BLOCK = (128, 128)
"""Weight block of the released FP8 checkpoint (DeepSeek-V3 style) when config.json does not name one."""
FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
"""safetensors dtype names of the FP8 formats that come with a block scale."""

# Hub (remote-code) spelling of config.json -> transformers' MiMoV2FlashConfig spelling.
HUB_LAYER_PATTERN, HUB_MOE_FREQ = "hybrid_layer_pattern", "moe_layer_freq"
HUB_RENAMED = {"layernorm_epsilon": "rms_norm_eps"}
HUB_DROPPED = ("auto_map", "attention_chunk_size", "topk_method", "swa_qk_head_dim")
"""Hub keys with no meaning for the architecture (remote code, inference kernels)."""
HUB_DEFAULT_ROPE = {"rope_theta": 5_000_000.0, "swa_rope_theta": 10_000.0, "partial_rotary_factor": 0.334}
"""Values the Hub's remote code assumes when config.json leaves a RoPE key out."""


class ConvertError(ValueError):
    """A checkpoint directory that cannot be converted; the message names the files or tensors and the fix."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str
    """safetensors' dtype name (F32, BF16, F8_E4M3, ...)."""


def read_hf_config(directory: Path):
    """The ``MiMoV2FlashConfig`` of a checkpoint directory, whether config.json uses transformers' keys or the
    Hub's original ones (``hybrid_layer_pattern``, ``moe_layer_freq``, ``rope_theta``/``swa_rope_theta``,
    ``swa_num_key_value_heads``, ...)."""
    from transformers import MiMoV2FlashConfig

    path = Path(directory) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConvertError(f"cannot read {path}: {err}; point at a Hugging Face MiMo-V2-Flash directory") from err
    return MiMoV2FlashConfig(**_transformers_spelling(raw, path))


def _transformers_spelling(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    if HUB_LAYER_PATTERN not in raw:
        return raw
    kwargs = {HUB_RENAMED.get(key, key): value for key, value in raw.items() if key not in HUB_DROPPED}
    _check_hub_only_keys(kwargs, path)
    kwargs["layer_types"] = [
        (AttentionType.SLIDING if value else AttentionType.GLOBAL).value for value in kwargs.pop(HUB_LAYER_PATTERN)
    ]
    if HUB_MOE_FREQ in kwargs:
        kwargs["mlp_layer_types"] = ["sparse" if value else "dense" for value in kwargs.pop(HUB_MOE_FREQ)]
    if kwargs.get("routed_scaling_factor") is None:
        kwargs["routed_scaling_factor"] = 1.0  # the Hub writes null for "no rescaling"
    rope = {key: kwargs.pop(key, default) for key, default in HUB_DEFAULT_ROPE.items()}
    kwargs.setdefault(
        "rope_parameters",
        {
            kind.value: {
                "rope_type": "default",
                "rope_theta": rope["swa_rope_theta" if kind is AttentionType.SLIDING else "rope_theta"],
                "partial_rotary_factor": rope["partial_rotary_factor"],
            }
            for kind in AttentionType
        },
    )
    return kwargs


def _check_hub_only_keys(kwargs: dict[str, Any], path: Path) -> None:
    """Hub keys that transformers' port (and mimo) fix to one value: consume them, refusing any other value."""
    allowed = {
        "swa_num_key_value_heads": (2 * kwargs.get("num_key_value_heads", 0),),
        "swa_num_attention_heads": (kwargs.get("num_attention_heads"),),
        "swa_head_dim": (kwargs.get("head_dim"),),
        "swa_v_head_dim": (kwargs.get("v_head_dim"),),
        "add_swa_attention_sink_bias": (True,),
        "add_full_attention_sink_bias": (False,),
        "n_shared_experts": (0, None),
        "scoring_func": ("sigmoid",),
        "rope_scaling": (None,),
    }
    wrong = []
    for key, values in allowed.items():
        if key in kwargs and (value := kwargs.pop(key)) not in values:
            wrong.append(f"{key}={value!r} (supported: {' or '.join(map(repr, values))})")
    if wrong:
        raise ConvertError(f"{path}: settings mimo's MiMo-V2-Flash does not support: {'; '.join(wrong)}")


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


def hub_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor of a Hub-format checkpoint of this model, MTP blocks included: what
    ``save_pretrained`` writes plus ``model.mtp.layers.K.*``."""
    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for layer, kind in enumerate(cfg.layer_types()):
        shapes.update(_layer_shapes(cfg, f"model.layers.{layer}.", kind, cfg.is_moe(layer), "post_attention_layernorm"))
    for depth in range(cfg.mtp_num_layers):
        prefix = f"model.mtp.layers.{depth}."
        shapes.update({f"{prefix}{norm}.weight": (hidden,) for norm in ("enorm", "hnorm", "final_layernorm")})
        shapes[f"{prefix}eh_proj.weight"] = (hidden, 2 * hidden)
        shapes.update(_layer_shapes(cfg, prefix, AttentionType.SLIDING, False, HUB_MTP_PRE_MLP_NORM))
    return shapes


def _layer_shapes(
    cfg: ModelConfig, prefix: str, kind: AttentionType, moe: bool, pre_mlp_norm: str
) -> dict[str, tuple[int, ...]]:
    hidden, heads, groups = cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads(kind)
    attn = f"{prefix}self_attn."
    shapes = {
        f"{prefix}input_layernorm.weight": (hidden,),
        f"{prefix}{pre_mlp_norm}.weight": (hidden,),
        f"{attn}q_proj.weight": (heads * cfg.head_dim, hidden),
        f"{attn}k_proj.weight": (groups * cfg.head_dim, hidden),
        f"{attn}v_proj.weight": (groups * cfg.v_head_dim, hidden),
        f"{attn}o_proj.weight": (hidden, heads * cfg.v_head_dim),
    }
    if cfg.has_sink(kind):
        shapes[f"{attn}attention_sink_bias"] = (heads,)
    if not moe:
        return {**shapes, **_ffn_shapes(f"{prefix}mlp.", hidden, cfg.ffn_hidden_size)}
    shapes[f"{prefix}mlp.gate.weight"] = (cfg.num_experts, hidden)
    shapes[f"{prefix}mlp.gate.e_score_correction_bias"] = (cfg.num_experts,)
    for expert in range(cfg.num_experts):
        shapes.update(_ffn_shapes(f"{prefix}mlp.experts.{expert}.", hidden, cfg.moe_ffn_hidden_size))
    return shapes


def _ffn_shapes(prefix: str, hidden: int, width: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}gate_proj.weight": (width, hidden),
        f"{prefix}up_proj.weight": (width, hidden),
        f"{prefix}down_proj.weight": (hidden, width),
    }


class _ShardWriter:
    """Collects tensors into safetensors files of at most ``max_bytes`` (a bigger tensor gets a file of its own)."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.total_bytes = 0
        self.files: list[Path] = []
        self.file_of: dict[str, int] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        # A copy: tensors split from one mimo tensor share its storage, which safetensors refuses to write.
        self.pending[name] = tensor.detach().contiguous().clone()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes
        self.file_of[name] = len(self.files)

    def flush(self) -> None:
        self.files.append(self.directory / f"model-{len(self.files) + 1:05d}.safetensors.partial")
        save_file(self.pending, str(self.files[-1]), metadata=SAFETENSORS_METADATA)
        self.pending, self.pending_bytes = {}, 0


def save_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]], directory: Path, max_shard_bytes: int, total: int | None = None
) -> list[Path]:
    """Write (name, tensor) pairs as safetensors files named as ``save_pretrained`` names them: one
    ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus the index; returns the files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(directory, max_shard_bytes)
    for name, tensor in tqdm(tensors, total=total, desc="writing", unit="tensor"):
        writer.add(name, tensor)
    writer.flush()
    if len(writer.files) == 1:
        return [writer.files[0].rename(directory / SINGLE_FILE)]
    count = len(writer.files)
    final = [
        path.rename(directory / f"model-{i + 1:05d}-of-{count:05d}.safetensors") for i, path in enumerate(writer.files)
    ]
    index = {
        "metadata": {"total_size": writer.total_bytes},
        "weight_map": {name: final[file].name for name, file in writer.file_of.items()},
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    return final + [directory / INDEX_FILE]
