"""Training data: the shipped corpus and tokenizer, preprocessing, blends and the sample iterators.

The public names below load lazily, so importing ``mimo.data.config`` (as the Hydra recipes do) does
not pull in megatron-core and transformers.
"""

import importlib

_EXPORTS = {
    "DataIterators": "mimo.data.loader",
    "DataRank": "mimo.data.loader",
    "build_data_iterators": "mimo.data.loader",
    "build_tokenizer": "mimo.data.tokenizer",
    "check_vocab": "mimo.data.tokenizer",
    "MimoTokenizer": "mimo.data.tokenizer",
    "DataError": "mimo.data.errors",
    "stage_config": "mimo.data.stages",
}

__all__ = [
    "DataError",
    "DataIterators",
    "DataRank",
    "MimoTokenizer",
    "build_data_iterators",
    "build_tokenizer",
    "check_vocab",
    "stage_config",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mimo.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
