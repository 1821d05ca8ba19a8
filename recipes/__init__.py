"""Recipes: YAML files composed with Hydra into the typed ``MimoConfig``.

``schema`` (the dataclass), ``compose`` (``load_config`` and the shared command line) and ``errors`` (``MimoError``,
the base of every user-facing error, and ``ConfigError``). The names below load on first use (PEP 562): importing
``mimo.recipes.errors`` from the lowest layers must not pull in Hydra.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "MimoConfig": "mimo.recipes.schema",
    "MimoError": "mimo.recipes.errors",
    "ConfigError": "mimo.recipes.errors",
    "load_config": "mimo.recipes.compose",
    "to_yaml": "mimo.recipes.compose",
    "to_container": "mimo.recipes.compose",
    "available_recipes": "mimo.recipes.compose",
    "recipe_argument_parser": "mimo.recipes.compose",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mimo.recipes' has no attribute {name!r}")
