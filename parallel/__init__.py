"""Parallel layout and distributed runtime.

The config and the layout check are imported eagerly: they are pure Python, and the config is imported by every
recipe. The runtime pieces pull in torch.distributed and megatron-core, so they load on first use (PEP 562).
"""

from importlib import import_module
from typing import Any

from mimo.parallel.config import ParallelConfig
from mimo.parallel.layout import LayoutError, ResolvedLayout, validate_layout

_LAZY = {
    "Runtime": "mimo.parallel.runtime",
    "LaunchError": "mimo.parallel.runtime",
    "initialize": "mimo.parallel.runtime",
    "shutdown": "mimo.parallel.runtime",
    "enable_cpu_compat": "mimo.parallel.cpu_compat",
    "UnsupportedMegatronVersion": "mimo.parallel.cpu_compat",
}

__all__ = [
    "ParallelConfig",
    "LayoutError",
    "ResolvedLayout",
    "validate_layout",
    "Runtime",
    "LaunchError",
    "initialize",
    "shutdown",
    "enable_cpu_compat",
    "UnsupportedMegatronVersion",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mimo.parallel' has no attribute {name!r}")
