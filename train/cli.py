"""``mimo-train`` / ``python -m mimo.train``: compose the recipe, check it, then train."""

import os
import sys
from collections.abc import Sequence

from mimo.parallel.layout import validate_layout
from mimo.parallel.runtime import LaunchEnv, launch_env
from mimo.recipes.compose import load_config, recipe_argument_parser
from mimo.recipes.errors import ConfigError, run_command
from mimo.recipes.schema import MimoConfig
from mimo.train.commands import quiet_expected_warnings, setup_logging

PROG = "mimo-train"


def preflight(cfg: MimoConfig) -> LaunchEnv:
    """The checks that need neither megatron-core nor a process group, so a typo fails in a second."""
    cfg.model.validate()
    cfg.validate_training()
    launch = launch_env(os.environ, default_port=cfg.parallel.master_port)
    validate_layout(
        cfg.parallel,
        cfg.model,
        launch.world_size,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        seq_length=cfg.train.seq_length,
    )
    return launch


def train(cfg: MimoConfig) -> None:
    launch = preflight(cfg)
    setup_logging(is_main=launch.rank == 0)
    # megatron-core is imported only once the config and layout are known to be valid.
    from mimo.train.trainer import run_training

    run_training(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    quiet_expected_warnings()
    parser = recipe_argument_parser(PROG, "Pre-train a MiMo-V2-Flash-shaped model with megatron-core.")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.overrides, config_name=args.config_name)
    except ConfigError as err:
        parser.error(str(err))
    return run_command(PROG, lambda: train(cfg))


if __name__ == "__main__":
    sys.exit(main())
