"""The top-level config schema and the one function every entry point uses to compose a recipe with overrides.

Recipes are YAML files in this folder (``config.yaml`` is the default); config groups (``model/``) live in
sub-folders. Every key is overridable as ``key=value``; a group is chosen with ``model=mimo_v2_flash``.
"""

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mimo.data.config import DataConfig
from mimo.model.config import ModelConfig, PrecisionConfig
from mimo.parallel.config import ParallelConfig
from mimo.train.config import (
    CheckpointConfig,
    LoggingConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from mimo.train.schedule import ScheduleConfig

RECIPES_DIR = Path(__file__).resolve().parent
SCHEMA_NAME = "mimo_schema"


@dataclass
class MimoConfig:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


class ConfigError(ValueError):
    """A recipe or override that cannot be composed into a valid config."""


ConfigStore.instance().store(name=SCHEMA_NAME, node=MimoConfig)


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_config(overrides: Sequence[str] = (), config_name: str = "config") -> MimoConfig:
    """Compose ``config_name`` with ``key=value`` overrides into a typed, fully resolved MimoConfig."""
    if config_name not in available_recipes():
        raise ConfigError(f"unknown recipe {config_name!r}; available: {', '.join(available_recipes())}")
    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base=None):
            composed = compose(config_name=config_name, overrides=list(overrides))
        cfg = OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"invalid recipe {config_name!r} with overrides {list(overrides)}: {err}") from err
    if cfg.checkpoint.dir is None:
        cfg.checkpoint.dir = str(Path(cfg.run.dir) / "checkpoints")
    return cfg


def to_yaml(cfg: MimoConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def recipe_argument_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line every mimo entry point shares: a recipe name and ``key=value`` overrides."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="overrides: any config key, e.g. train.steps=50 parallel.ep=2 model=mimo_v2_flash",
    )
    parser.add_argument("--config-name", "-c", default="config", help=f"recipe in {RECIPES_DIR} (default: config)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser
