"""Turns a data config into the (prefixes, weights) blend megatron-core's builder takes.

Besides user datasets this materialises the two kinds of derived dataset the config can ask for,
each once per cache directory: the shipped corpus tokenized with the run's tokenizer, and the
long-document subset of each dataset that long-context stages upsample.
"""

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)

from mimo.data.config import DataConfig, LongDocConfig
from mimo.data.distributed import rank_zero_first
from mimo.data.errors import DataError
from mimo.data.indexed import document_lengths, is_complete, open_indexed, token_dtype, write_indexed
from mimo.data.shipped_corpus import shipped_corpus_path
from mimo.data.tokenizer import MimoTokenizer, encode_documents

SHIPPED_PREFIX = "mimo:jargon"
"""Names the shipped corpus inside a blend, e.g. ["0.5", "mimo:jargon", "0.5", "/data/code"]."""
SPLIT_NAMES = ("train", "valid", "test")
SHIPPED_BATCH_DOCUMENTS = 256
"""Documents per batched tokenizer call when materialising the shipped corpus."""


@dataclass
class Blend:
    prefixes: list[str]
    weights: list[float] | None
    """None: megatron weighs datasets by their size."""
    names: list[str]
    """A short label per dataset for logs (same order as prefixes)."""


def parse_blend(items: list[str]) -> Blend:
    """Parses "weight prefix weight prefix ..." (one list item or several); a lone prefix needs no weight."""
    tokens = [token for item in items for token in str(item).split()]
    if len(tokens) == 1:
        return Blend([tokens[0]], None, [_label(tokens[0])])
    weights, prefixes = tokens[0::2], tokens[1::2]
    try:
        values = [float(weight) for weight in weights]
    except ValueError:
        values = []
    if len(tokens) % 2 or len(values) != len(prefixes) or any(value < 0 for value in values) or sum(values) <= 0:
        raise DataError(
            f"data.blend {items!r} must alternate a non-negative weight and a dataset prefix, "
            f'e.g. ["0.7", "/data/web_text_document", "0.3", "/data/code_text_document"]'
        )
    return Blend(prefixes, values, [_label(prefix) for prefix in prefixes])


def _label(prefix: str) -> str:
    return Path(prefix).name if prefix != SHIPPED_PREFIX else SHIPPED_PREFIX


def resolve_blend(cfg: DataConfig, tokenizer: MimoTokenizer, cache_dir: Path) -> Blend:
    """The blend of ``cfg`` with every prefix pointing at a checked .bin/.idx pair on disk."""
    blend = parse_blend(cfg.blend) if cfg.blend else parse_blend([SHIPPED_PREFIX])
    prefixes = [
        _materialise_shipped(cache_dir, tokenizer) if prefix == SHIPPED_PREFIX else prefix for prefix in blend.prefixes
    ]
    for prefix in prefixes:
        dataset = open_indexed(prefix)
        _check_token_range(prefix, dataset, tokenizer)
        _check_splits(prefix, len(dataset), cfg.split)
        del dataset
    return Blend(prefixes, blend.weights, blend.names)


def check_blend_files(cfg: DataConfig) -> None:
    """Open every dataset the blend names (not the shipped corpus, which mimo writes itself): a missing, foreign or
    damaged .bin/.idx stops the run here, before any model is built, rather than when the data is."""
    blend = parse_blend(cfg.blend) if cfg.blend else parse_blend([SHIPPED_PREFIX])
    for prefix in blend.prefixes:
        if prefix != SHIPPED_PREFIX:
            open_indexed(prefix)


def split_ranges(num_documents: int, split: str) -> list[tuple[int, int] | None]:
    """The [begin, end) document range of each split (train, valid, test) exactly as megatron-core cuts it."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [
        None if bookends is None else (round(bookends[0] * num_documents), round(bookends[1] * num_documents))
        for bookends in matrix
    ]


def _check_splits(prefix: str, num_documents: int, split: str) -> None:
    """megatron-core loops forever building a split that has no document, so refuse it up front."""
    for name, bounds in zip(SPLIT_NAMES, split_ranges(num_documents, split)):
        if bounds is not None and bounds[1] <= bounds[0]:
            raise DataError(
                f"{prefix} has {num_documents} documents, too few for a non-empty {name} split with "
                f"data.split={split!r}; add documents, or give {name} a larger share (or 0) in data.split"
            )


def _check_token_range(prefix: str, dataset, tokenizer: MimoTokenizer) -> None:
    """A dataset tokenized with a bigger vocabulary than this run's would index past the embedding."""
    if numpy.iinfo(dataset.index.dtype).max < tokenizer.vocab_size - 1:
        raise DataError(
            f"{prefix}.idx stores {dataset.index.dtype.__name__} token ids, too narrow for the "
            f"{tokenizer.vocab_size}-token tokenizer; re-run mimo-preprocess with that tokenizer"
        )


def _materialise_shipped(cache_dir: Path, tokenizer: MimoTokenizer) -> str:
    """Tokenizes the shipped corpus into the cache once per tokenizer (by rank 0)."""
    prefix = str(cache_dir / "shipped" / tokenizer.fingerprint / "jargon_text_document")

    def build() -> None:
        if is_complete(prefix):
            return
        with gzip.open(shipped_corpus_path(), "rt", encoding="utf-8") as reader:
            texts = [json.loads(line)["text"] for line in reader]
        dtype = token_dtype(tokenizer.vocab_size)
        batches = (
            encode_documents(tokenizer.hf, texts[start : start + SHIPPED_BATCH_DOCUMENTS], dtype)
            for start in range(0, len(texts), SHIPPED_BATCH_DOCUMENTS)
        )
        write_indexed(prefix, (doc for batch in batches for doc in batch), dtype)

    rank_zero_first(build, lambda: is_complete(prefix), f"the shipped corpus dataset {prefix}")
    return prefix


def long_document_blend(blend: Blend, long_docs: LongDocConfig, split: str, cache_dir: Path) -> Blend:
    """The long-document subsets of the blend's datasets, weighted among themselves like the datasets
    (by token count when the blend has no weights). Only training documents enter a subset, so
    upsampling never leaks validation documents into training."""
    if not 0 < long_docs.weight < 1:
        raise DataError(
            f"data.long_docs.weight is {long_docs.weight}; it is the share of samples drawn "
            f"from long documents, so it must lie strictly between 0 and 1"
        )
    weights = blend.weights or dataset_token_counts(blend)
    subsets, subset_weights, names = [], [], []
    for prefix, weight, name in zip(blend.prefixes, weights, blend.names):
        subset = _long_document_subset(prefix, long_docs.min_tokens, split, cache_dir)
        if subset is not None and weight > 0:
            subsets.append(subset)
            subset_weights.append(weight)
            names.append(f"{name}>={long_docs.min_tokens}")
    if not subsets:
        raise DataError(
            f"no training document in {blend.prefixes} has data.long_docs.min_tokens="
            f"{long_docs.min_tokens} tokens or more; lower the threshold or add long documents"
        )
    return Blend(subsets, subset_weights, names)


def dataset_token_counts(blend: Blend) -> list[float]:
    return [float(document_lengths(prefix).sum()) for prefix in blend.prefixes]


def _long_document_subset(prefix: str, min_tokens: int, split: str, cache_dir: Path) -> str | None:
    """A cached copy of the training documents of ``prefix`` at least ``min_tokens`` long; None if none."""
    source = open_indexed(prefix)
    lengths = source.index.sequence_lengths
    begin, end = split_ranges(len(lengths), split)[0]
    keep = begin + numpy.flatnonzero(lengths[begin:end] >= min_tokens)
    if keep.size == 0:
        return None
    stat = os.stat(prefix + ".bin")
    key = f"{os.path.abspath(prefix)}|{stat.st_size}|{stat.st_mtime_ns}|{min_tokens}|{begin}:{end}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    subset = str(cache_dir / "long_docs" / digest / f"{Path(prefix).name}_min{min_tokens}")

    def build() -> None:
        if not is_complete(subset):
            write_indexed(subset, (source[int(i)] for i in keep), source.index.dtype)

    rank_zero_first(build, lambda: is_complete(subset), f"the long-document subset {subset}")
    return subset
