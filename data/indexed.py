"""Writing and opening megatron-core indexed datasets (.bin/.idx pairs) safely.

A dataset is complete exactly when its .idx exists: the .bin is written first and both files are
renamed into place from temporary names, so an interrupted writer never leaves a pair that looks done.
"""

import gc
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from mimo.data.errors import DataError

TMP_SUFFIX = ".tmp"


def token_dtype(vocab_size: int) -> type:
    """The narrowest integer type megatron reads that holds every token id."""
    return DType.optimal_dtype(vocab_size)


def is_complete(prefix: str) -> bool:
    return os.path.isfile(get_idx_path(prefix)) and os.path.isfile(get_bin_path(prefix))


def write_indexed(prefix: str, documents: Iterable[Sequence[int]], dtype: type) -> None:
    """Writes one sequence per document (the caller has already appended end-of-document)."""
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = prefix + TMP_SUFFIX
    builder = IndexedDatasetBuilder(get_bin_path(tmp_prefix), dtype=dtype)
    for tokens in documents:
        array = numpy.asarray(tokens)
        builder.add_document(array, [array.size])
    builder.finalize(get_idx_path(tmp_prefix))
    os.replace(get_bin_path(tmp_prefix), get_bin_path(prefix))
    os.replace(get_idx_path(tmp_prefix), get_idx_path(prefix))


def merge_indexed(prefix: str, parts: Sequence[str], dtype: type) -> None:
    """Concatenates finished datasets, in order, into one (atomically, like write_indexed)."""
    # IndexedDatasetBuilder.add_index runs gc.collect() per part, which walks every object torch and
    # friends allocated at import (a quarter second each here); frozen objects are skipped.
    gc.freeze()
    tmp_prefix = prefix + TMP_SUFFIX
    builder = IndexedDatasetBuilder(get_bin_path(tmp_prefix), dtype=dtype)
    for part in parts:
        open_indexed(part)
        builder.add_index(part)
    builder.finalize(get_idx_path(tmp_prefix))
    os.replace(get_bin_path(tmp_prefix), get_bin_path(prefix))
    os.replace(get_idx_path(tmp_prefix), get_idx_path(prefix))


def open_indexed(prefix: str) -> IndexedDataset:
    """Opens a dataset after checking what megatron would otherwise trip over deep inside training:
    missing files, a foreign or truncated .idx, and a .bin whose size disagrees with its .idx."""
    idx_path, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataError(
                f"{path} does not exist; check the dataset prefix in data.blend "
                f"(a prefix names the .bin/.idx pair without extension) or run mimo-preprocess"
            )
    try:
        dataset = IndexedDataset(prefix, mmap=True)
    except (AssertionError, ValueError, struct.error) as error:
        raise DataError(
            f"{idx_path} is not a readable megatron-core index ({error}); re-create it with mimo-preprocess"
        ) from error
    lengths, pointers = dataset.index.sequence_lengths, dataset.index.sequence_pointers
    expected = int(pointers[-1]) + int(lengths[-1]) * dataset.index.dtype_size if len(lengths) else 0
    actual = os.path.getsize(bin_path)
    if actual != expected:
        raise DataError(
            f"{bin_path} has {actual} bytes but {idx_path} describes {expected}: the pair "
            f"does not match (truncated copy or mixed-up files); re-create it with mimo-preprocess"
        )
    return dataset


def document_lengths(prefix: str) -> numpy.ndarray:
    """A copy of the per-document token counts: the index arrays are views into a memory map that
    is closed when the IndexedDataset is collected, so they must not outlive it."""
    dataset = open_indexed(prefix)
    lengths = numpy.array(dataset.index.sequence_lengths)
    del dataset
    return lengths
