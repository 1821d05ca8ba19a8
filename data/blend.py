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
from typing import List, Optional

import numpy

from mimo.data.config import DataConfig, LongDocConfig
from mimo.data.distributed import rank_zero_first
from mimo.data.errors import DataError
from mimo.data.indexed import document_lengths, is_complete, open_indexed, token_dtype, write_indexed
from mimo.data.shipped_corpus import shipped_corpus_path
from mimo.data.tokenizer import MimoTokenizer, encode_documents

SHIPPED_PREFIX = "mimo:jargon"
"""Names the shipped corpus inside a blend, e.g. ["0.5", "mimo:jargon", "0.5", "/data/code"]."""
SHIPPED_BATCH_DOCUMENTS = 256
"""Documents per batched tokenizer call when materialising the shipped corpus."""


@dataclass
class Blend:
    prefixes: List[str]
    weights: Optional[List[float]]
    """None: megatron weighs datasets by their size."""
    names: List[str]
    """A short label per dataset for logs (same order as prefixes)."""


def parse_blend(items: List[str]) -> Blend:
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
        raise DataError(f"data.blend {items!r} must alternate a non-negative weight and a dataset prefix, "
                        f'e.g. ["0.7", "/data/web_text_document", "0.3", "/data/code_text_document"]')
    return Blend(prefixes, values, [_label(prefix) for prefix in prefixes])


def _label(prefix: str) -> str:
    return Path(prefix).name if prefix != SHIPPED_PREFIX else SHIPPED_PREFIX


def resolve_blend(cfg: DataConfig, tokenizer: MimoTokenizer, cache_dir: Path) -> Blend:
    """The blend of ``cfg`` with every prefix pointing at a checked .bin/.idx pair on disk."""
    blend = parse_blend(cfg.blend) if cfg.blend else parse_blend([SHIPPED_PREFIX])
    prefixes = [_materialise_shipped(cache_dir, tokenizer) if prefix == SHIPPED_PREFIX else prefix
                for prefix in blend.prefixes]
    for prefix in prefixes:
        dataset = open_indexed(prefix)
        _check_token_range(prefix, dataset, tokenizer)
    blend = Blend(prefixes, blend.weights, blend.names)
    if cfg.long_docs.min_tokens > 0 and cfg.long_docs.weight > 0:
        blend = _add_long_documents(blend, cfg.long_docs, cache_dir)
    return blend


def _check_token_range(prefix: str, dataset, tokenizer: MimoTokenizer) -> None:
    """A dataset tokenized with a bigger vocabulary than this run's would index past the embedding."""
    if numpy.iinfo(dataset.index.dtype).max < tokenizer.vocab_size - 1:
        raise DataError(f"{prefix}.idx stores {dataset.index.dtype.__name__} token ids, too narrow for the "
                        f"{tokenizer.vocab_size}-token tokenizer; re-run mimo-preprocess with that tokenizer")


def _materialise_shipped(cache_dir: Path, tokenizer: MimoTokenizer) -> str:
    """Tokenizes the shipped corpus into the cache once per tokenizer (by rank 0)."""
    prefix = str(cache_dir / "shipped" / tokenizer.fingerprint / "jargon_text_document")

    def build() -> None:
        if is_complete(prefix):
            return
        with gzip.open(shipped_corpus_path(), "rt", encoding="utf-8") as reader:
            texts = [json.loads(line)["text"] for line in reader]
        dtype = token_dtype(tokenizer.vocab_size)
        batches = (encode_documents(tokenizer.hf, texts[start:start + SHIPPED_BATCH_DOCUMENTS], dtype)
                   for start in range(0, len(texts), SHIPPED_BATCH_DOCUMENTS))
        write_indexed(prefix, (doc for batch in batches for doc in batch), dtype)

    rank_zero_first(build, lambda: is_complete(prefix), f"the shipped corpus dataset {prefix}")
    return prefix


def _add_long_documents(blend: Blend, long_docs: LongDocConfig, cache_dir: Path) -> Blend:
    """Adds each dataset's long-document subset with ``long_docs.weight`` of the mass, split between
    the subsets like the original weights (token counts when the blend has none); the original
    datasets keep the rest."""
    if not 0 < long_docs.weight < 1:
        raise DataError(f"data.long_docs.weight is {long_docs.weight}; it is the share of samples drawn "
                        f"from long documents, so it must lie strictly between 0 and 1")
    base = blend.weights or [float(document_lengths(prefix).sum()) for prefix in blend.prefixes]
    total = sum(base)
    subsets, subset_weights, subset_names = [], [], []
    for prefix, weight, name in zip(blend.prefixes, base, blend.names):
        subset = _long_document_subset(prefix, long_docs.min_tokens, cache_dir)
        if subset is not None:
            subsets.append(subset)
            subset_weights.append(weight)
            subset_names.append(f"{name}>={long_docs.min_tokens}")
    if not subsets:
        raise DataError(f"no document in {blend.prefixes} has data.long_docs.min_tokens="
                        f"{long_docs.min_tokens} tokens or more; lower the threshold or add long documents")
    subset_total = sum(subset_weights)
    weights = ([w / total * (1 - long_docs.weight) for w in base]
               + [w / subset_total * long_docs.weight for w in subset_weights])
    return Blend(blend.prefixes + subsets, weights, blend.names + subset_names)


def _long_document_subset(prefix: str, min_tokens: int, cache_dir: Path) -> Optional[str]:
    """A cached copy of the documents of ``prefix`` at least ``min_tokens`` long; None if there are none."""
    source = open_indexed(prefix)
    stat = os.stat(prefix + ".bin")
    key = hashlib.sha256(f"{os.path.abspath(prefix)}|{stat.st_size}|{stat.st_mtime_ns}|{min_tokens}".encode())
    subset = str(cache_dir / "long_docs" / key.hexdigest()[:16] / f"{Path(prefix).name}_min{min_tokens}")
    lengths = source.index.sequence_lengths
    if not (lengths >= min_tokens).any():
        return None

    def build() -> None:
        if is_complete(subset):
            return
        keep = numpy.flatnonzero(lengths >= min_tokens)
        write_indexed(subset, (source[int(i)] for i in keep), source.index.dtype)

    rank_zero_first(build, lambda: is_complete(subset), f"the long-document subset {subset}")
    return subset
