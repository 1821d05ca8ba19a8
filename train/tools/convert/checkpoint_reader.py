"""The tensors of a mimo checkpoint read one at a time, in one process, without a process group and without
building the model: what ``export-hf`` needs to convert a checkpoint of any size on one machine without GPUs.

A mimo checkpoint is megatron-core dist_checkpointing's torch_dist format: torch.distributed.checkpoint files in
which every rank's shard of a tensor is a chunk of its own, and a metadata file saying which chunk covers which
region of which global tensor. A read names a key and a region; torch's resharding planner lists the chunk reads
that cover the region, and only those bytes are copied into a fresh tensor. Memory: the region plus the chunk
being copied from.
"""

import math
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from mimo.train.tools.convert.hf_files import ConvertError


class _RegionPlanner(DefaultLoadPlanner):
    """Copies every chunk read into the region's tensor at the read's offsets (torch's default planner looks a
    destination up as a whole tensor of the state dict, which a region at a nonzero offset is not)."""

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        region = self.state_dict[read_item.dest_index.fqn]
        spans = zip(read_item.dest_offsets, read_item.lengths)
        return region[tuple(slice(start, start + size) for start, size in spans)]


class CheckpointReader:
    """Reads regions of the tensors of one checkpoint directory (``step_N``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._storage = FileSystemReader(str(self.path))
        try:
            self._metadata = self._storage.read_metadata()
        except Exception as err:  # a missing or unreadable .metadata file
            raise ConvertError(f"cannot read the shard index of {self.path}: {err}") from err
        self._storage.set_up_storage_reader(self._metadata, True)

    def _entry(self, key: str) -> TensorStorageMetadata:
        entry = self._metadata.state_dict_metadata.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            raise ConvertError(
                f"{self.path} holds no tensor {key!r}; the checkpoint does not match the model its metadata"
                " describes (a damaged or foreign checkpoint?)"
            )
        return entry

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key).properties.dtype

    def read(self, key: str, shape: tuple[int, ...], index: tuple[int, ...] = ()) -> torch.Tensor:
        """The tensor ``key``, of ``shape``; with an ``index``, the slice at those positions of the key's leading
        (prepended) axes, e.g. one expert of a MoE layer's experts."""
        entry = self._entry(key)
        size = tuple(entry.size)
        if size[len(index) :] != tuple(shape) or any(not 0 <= i < n for i, n in zip(index, size)):
            raise ConvertError(
                f"{self.path}: {key} has shape {list(size)}, but the model config asks for"
                f" {list(shape)}{f' at {list(index)}' if index else ''}; the checkpoint's metadata and tensors disagree"
            )
        region = torch.empty((1,) * len(index) + tuple(shape), dtype=entry.properties.dtype)
        chunk = ChunkStorageMetadata(offsets=torch.Size((*index, *[0] * len(shape))), sizes=region.shape)
        reads = create_read_items_for_chunk_list(key, entry, [chunk])
        if sum(math.prod(read.lengths) for read in reads) != region.numel():
            raise ConvertError(
                f"{self.path}: the saved chunks of {key} do not cover it exactly; the checkpoint is damaged"
            )
        planner = _RegionPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
        planner.set_up_planner({key: region}, self._metadata, True)
        self._storage.read_data(LoadPlan(reads), planner).wait()
        return region.reshape(shape)
