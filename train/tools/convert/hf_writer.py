"""Sharded safetensors written one tensor at a time: for each shard the bytes ``safetensors.torch.save_file``
writes, named and indexed as ``save_pretrained`` names them, while holding one tensor at a time.

A safetensors file is the header's length (8 bytes, little-endian), a JSON header (``__metadata__`` first, then
each tensor's dtype, shape and data offsets in the order its bytes are stored: by dtype, then by name), padded
with spaces to a multiple of 8 bytes, then the tensors' bytes back to back. All of it except the bytes follows
from names, dtypes and shapes, so the writer plans the files from those up front (greedily, in the given order,
as ``save_pretrained`` shards), writes every header, and then puts each tensor's bytes at its offset when it
arrives.
"""

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mimo.train.tools.convert.hf_files import INDEX_FILE, SINGLE_FILE, ConvertError

SAFETENSORS_METADATA = {"format": "pt"}
"""transformers refuses safetensors files whose metadata does not say they hold PyTorch tensors."""
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
"""The floating dtypes a checkpoint holds, in the order safetensors stores them in a file."""
HEADER_LENGTH = struct.Struct("<Q")
HEADER_ALIGNMENT = 8
HEADER_PADDING = b" "
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: Sequence[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Tensors grouped into files in order: a file takes tensors until the next would take it past ``max_bytes``
    (a bigger tensor gets a file of its own)."""
    files: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if files[-1] and size + tensor.nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(tensor)
        size += tensor.nbytes
    return files


def safetensors_header(tensors: Sequence[PlannedTensor]) -> tuple[bytes, dict[str, int]]:
    """The bytes before the data of a file holding ``tensors`` and each tensor's data offset in the file."""
    unknown = sorted({str(tensor.dtype) for tensor in tensors if tensor.dtype not in SAFETENSORS_DTYPES})
    if unknown:
        raise ConvertError(f"cannot write {unknown} tensors; export writes {list(map(str, SAFETENSORS_DTYPES))}")
    rank = {dtype: position for position, dtype in enumerate(SAFETENSORS_DTYPES)}
    stored = sorted(tensors, key=lambda tensor: (rank[tensor.dtype], tensor.name))
    entries, starts, offset = {"__metadata__": SAFETENSORS_METADATA}, {}, 0
    for tensor in stored:
        entries[tensor.name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        starts[tensor.name] = offset
        offset += tensor.nbytes
    header = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    header += HEADER_PADDING * (-len(header) % HEADER_ALIGNMENT)
    prefix = HEADER_LENGTH.pack(len(header)) + header
    return prefix, {name: len(prefix) + start for name, start in starts.items()}


@dataclass(frozen=True)
class _Slot:
    file: Path
    offset: int
    tensor: PlannedTensor


class ShardedSafetensorsWriter:
    """Writes the planned tensors, in any order, into ``directory``; ``finish()`` names the files as
    ``save_pretrained`` does and writes the index. Leaving the ``with`` block on an error removes the files."""

    def __init__(self, directory: Path, tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> None:
        self.directory = Path(directory)
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.partial = [self.directory / f"model-{i + 1:05d}{PARTIAL_SUFFIX}" for i in range(len(self.shards))]
        self._slots: dict[str, _Slot] = {}
        self._written: set[str] = set()

    def __enter__(self) -> "ShardedSafetensorsWriter":
        self.directory.mkdir(parents=True, exist_ok=True)
        for path, shard in zip(self.partial, self.shards):
            prefix, offsets = safetensors_header(shard)
            with path.open("wb") as file:
                file.write(prefix)
                file.truncate(len(prefix) + sum(tensor.nbytes for tensor in shard))
            self._slots.update({tensor.name: _Slot(path, offsets[tensor.name], tensor) for tensor in shard})
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            for path in self.partial:
                path.unlink(missing_ok=True)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self._slots.get(name)
        if slot is None or name in self._written:
            raise ConvertError(f"{name}: {'written twice' if slot else 'not among the planned tensors'}")
        if tensor.dtype != slot.tensor.dtype or tuple(tensor.shape) != slot.tensor.shape:
            raise ConvertError(
                f"{name}: got a {tensor.dtype} tensor of shape {list(tensor.shape)}, planned"
                f" {slot.tensor.dtype} {list(slot.tensor.shape)}; the checkpoint does not match its model config"
            )
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        with slot.file.open("r+b") as file:
            file.seek(slot.offset)
            file.write(data)
        self._written.add(name)

    def finish(self) -> list[Path]:
        """Check that every planned tensor arrived, give the files their final names and write the index."""
        missing = sorted(self._slots.keys() - self._written)
        if missing:
            raise ConvertError(f"{len(missing)} planned tensors were never written, e.g. {missing[:3]}")
        if len(self.shards) == 1:
            return [self.partial[0].rename(self.directory / SINGLE_FILE)]
        count = len(self.shards)
        final = [
            path.rename(self.directory / f"model-{i + 1:05d}-of-{count:05d}.safetensors")
            for i, path in enumerate(self.partial)
        ]
        index = {
            "metadata": {"total_size": sum(tensor.nbytes for shard in self.shards for tensor in shard)},
            "weight_map": {tensor.name: path.name for path, shard in zip(final, self.shards) for tensor in shard},
        }
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        return final + [self.directory / INDEX_FILE]
