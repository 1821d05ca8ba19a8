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
INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
INDEX_HEADER = struct.Struct("<9sQBQQ")
"""magic, version, token dtype code, sequence count, document count: the fixed start of a megatron .idx."""
INDEX_ENTRY_BYTES = (4, 8)
"""Per sequence: its length (int32) and its byte offset in the .bin (int64)."""
DOCUMENT_ENTRY_BYTES = 8
"""Per document boundary (int64), document count + 1 of them."""


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


def _check_index_header(idx_path: str) -> None:
    """Read the .idx's fixed header and refuse, before megatron parses it, one that is foreign, of another
    version, names no token type, holds no document, or whose size disagrees with the counts it states."""
    with open(idx_path, "rb") as stream:
        head = stream.read(INDEX_HEADER.size)
    problem = None
    if len(head) < INDEX_HEADER.size or not head.startswith(INDEX_MAGIC):
        problem = "it does not start with a megatron-core index header"
    else:
        _, version, dtype_code, sequences, documents = INDEX_HEADER.unpack(head)
        expected = INDEX_HEADER.size + sequences * sum(INDEX_ENTRY_BYTES) + documents * DOCUMENT_ENTRY_BYTES
        if version != INDEX_VERSION:
            problem = f"index version {version}, not {INDEX_VERSION}"
        elif dtype_code not in {dtype.value for dtype in DType}:
            problem = f"unknown token type code {dtype_code}"
        elif sequences == 0:
            problem = "it holds no document"
        elif os.path.getsize(idx_path) != expected:
            problem = f"{os.path.getsize(idx_path)} bytes where its counts need {expected} (truncated or damaged)"
    if problem is not None:
        raise DataError(
            f"{idx_path} is not a readable megatron-core index: {problem}; re-create it with mimo-preprocess"
        )


def open_indexed(prefix: str) -> IndexedDataset:
    """Opens a dataset after checking what megatron would otherwise trip over deep inside training:
    missing files, a foreign, empty or truncated .idx, and a .bin whose size disagrees with its .idx."""
    idx_path, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataError(
                f"{path} does not exist; check the dataset prefix in data.blend "
                f"(a prefix names the .bin/.idx pair without extension) or run mimo-preprocess"
            )
    _check_index_header(idx_path)
    try:
        dataset = IndexedDataset(prefix, mmap=True)
    except (AssertionError, ValueError, struct.error) as error:
        detail = str(error) or "its document bounds disagree with its sequence count"  # megatron's bare assert
        raise DataError(
            f"{idx_path} is not a readable megatron-core index ({detail}); re-create it with mimo-preprocess"
        ) from error
    index = dataset.index  # checked at both ends only: reading every entry would cost minutes on large data
    lengths, pointers, documents = index.sequence_lengths, index.sequence_pointers, index.document_indices
    if pointers[0] != 0 or documents[0] != 0 or documents[-1] != len(lengths):
        raise DataError(
            f"{idx_path} is not a readable megatron-core index: its offsets and document bounds are inconsistent"
            " (damaged); re-create it with mimo-preprocess"
        )
    expected = int(pointers[-1]) + int(lengths[-1]) * index.dtype_size
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
