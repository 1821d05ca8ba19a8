"""Recipes compose with key=value overrides into typed configs; bad keys and values fail before any work."""

import pytest
from omegaconf import OmegaConf

from mimo.model.config import ModelConfig
from mimo.recipes.compose import available_recipes, load_config, recipe_argument_parser, to_yaml
from mimo.recipes.errors import ConfigError
from mimo.recipes.schema import MimoConfig


def test_default_recipe_is_typed_and_fills_derived_paths():
    cfg = load_config()
    assert isinstance(cfg.model, ModelConfig)
    assert cfg.checkpoint.dir == f"{cfg.run.dir}/checkpoints"


def test_overrides_reach_every_group():
    cfg = load_config(["train.steps=7", "parallel.ep=2", "optim.lr=0.01", "run.dir=/tmp/x", "logging.wandb=offline"])
    assert (cfg.train.steps, cfg.parallel.ep, cfg.optim.lr) == (7, 2, 0.01)
    assert cfg.checkpoint.dir == "/tmp/x/checkpoints"
    assert cfg.logging.wandb == "offline"


def test_explicit_checkpoint_dir_is_kept():
    assert load_config(["checkpoint.dir=/elsewhere"]).checkpoint.dir == "/elsewhere"


def test_model_group_selects_the_full_model():
    cfg = load_config(["model=mimo_v2_flash"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_experts) == (48, 4096, 256)


@pytest.mark.parametrize(
    "override, named",
    [("train.stepz=3", "train.stepz"), ("train.steps=abc", "train.steps"), ("model=nonexistent", "nonexistent")],
)
def test_bad_overrides_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config([override])


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available: .*config"):
        load_config(config_name="no_such_recipe")
    assert "config" in available_recipes()


@pytest.mark.parametrize("recipe", ["config", "miniature", "mimo_v2_flash_stage3"])
def test_resolved_yaml_round_trips(recipe):
    """config.yaml, read back into the schema, is the config the run was started with."""
    cfg = load_config(["train.steps=11"], config_name=recipe)
    back = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MimoConfig), OmegaConf.create(to_yaml(cfg))))
    assert back == cfg and back.train.steps == 11 and back.checkpoint.dir.endswith("checkpoints")


def test_cli_parser_splits_recipe_and_overrides():
    args = recipe_argument_parser("mimo-train", "").parse_args(["-c", "miniature", "a.b=1", "c=2"])
    assert args.config_name == "miniature" and args.overrides == ["a.b=1", "c=2"]
