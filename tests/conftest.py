"""Shared fixtures: one data-index cache for the whole session, so each test trains instead of tokenizing."""

import warnings

import pytest

# Expected on every CPU machine: megatron-core announces its fallbacks when TE/Apex are absent.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")
