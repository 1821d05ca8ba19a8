"""Shared fixtures: one data-index cache for the whole session, so each test trains instead of tokenizing."""

import warnings

import pytest

# Expected on every CPU machine: megatron-core announces its fallbacks when TE/Apex are absent.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A random tiny transformers MiMo-V2-Flash saved in Hub format, with an MTP block (tests/tiny_hub.py)."""
    from tiny_hub import make_tiny_hub

    return make_tiny_hub(tmp_path_factory.mktemp("hub"))
