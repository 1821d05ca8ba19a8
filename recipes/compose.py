"""Composing a recipe with ``key=value`` overrides into a typed MimoConfig: the one function every command uses.

Recipes are YAML files in this folder (``config.yaml`` is the default); config groups (``model/``) live in
sub-folders. Every key is overridable as ``key=value``; a group is chosen with ``model=mimo_v2_flash``. The
schema is registered with Hydra's config store on first use, not at import.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mimo.recipes.errors import ConfigError
from mimo.recipes.schema import MimoConfig
from mimo.train.config import CHECKPOINTS_SUBDIR

RECIPES_DIR = Path(__file__).resolve().parent
SCHEMA_NAME = "mimo_schema"
DEFAULT_RECIPE = "config"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _register_schema() -> None:
    """Recipes name ``mimo_schema`` in their defaults list; Hydra finds it in its config store."""
    store = ConfigStore.instance()
    if SCHEMA_NAME + ".yaml" not in store.repo:
        store.store(name=SCHEMA_NAME, node=MimoConfig)


def load_config(overrides: Sequence[str] = (), config_name: str = DEFAULT_RECIPE) -> MimoConfig:
    """Compose ``config_name`` with ``key=value`` overrides into a typed, fully resolved MimoConfig."""
    if config_name not in available_recipes():
        raise ConfigError(f"unknown recipe {config_name!r}; available: {', '.join(available_recipes())}")
    _register_schema()
    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base=None):
            composed = compose(config_name=config_name, overrides=list(overrides))
        cfg = OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"invalid recipe {config_name!r} with overrides {list(overrides)}: {err}") from err
    if cfg.checkpoint.dir is None:
        cfg.checkpoint.dir = str(Path(cfg.run.dir) / CHECKPOINTS_SUBDIR)
    return cfg


def to_yaml(cfg: MimoConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_container(cfg: MimoConfig) -> dict:
    """The config as plain dicts and lists (what wandb stores as the run's config)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def recipe_argument_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line every mimo entry point shares: a recipe name and ``key=value`` overrides."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="overrides: any config key, e.g. train.steps=50 parallel.ep=2 model=mimo_v2_flash",
    )
    parser.add_argument(
        "--config-name", "-c", default=DEFAULT_RECIPE, help=f"recipe in {RECIPES_DIR} (default: {DEFAULT_RECIPE})"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser
