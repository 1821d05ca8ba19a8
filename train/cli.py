"""``mimo-train`` / ``python -m mimo.train``: compose the recipe, then train."""

import os
import sys
from collections.abc import Sequence

from mimo.model.config import ModelConfigError
from mimo.parallel.layout import LayoutError, validate_layout
from mimo.parallel.runtime import LaunchError, launch_env
from mimo.recipes import ConfigError, MimoConfig, load_config, recipe_argument_parser

USAGE_ERROR = 2


def preflight(cfg: MimoConfig) -> None:
    """The checks that need neither megatron-core nor a process group, so a typo fails in a second."""
    cfg.model.validate()
    world_size = launch_env(os.environ, default_port=cfg.parallel.master_port).world_size
    validate_layout(
        cfg.parallel,
        cfg.model,
        world_size,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        seq_length=cfg.train.seq_length,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = recipe_argument_parser("mimo-train", "Pre-train a MiMo-V2-Flash-shaped model with megatron-core.")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.overrides, config_name=args.config_name)
    except ConfigError as err:
        parser.error(str(err))
    try:
        preflight(cfg)
    except (ModelConfigError, LayoutError, LaunchError) as err:
        print(f"mimo-train: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    # megatron-core is imported only once the config and layout are known to be valid.
    from mimo.data.errors import DataError
    from mimo.parallel.cpu_compat import UnsupportedMegatronVersion
    from mimo.train.checkpoint import CheckpointError
    from mimo.train.loop import run_training
    from mimo.train.schedule import ScheduleError

    user_errors = (
        ConfigError,
        LayoutError,
        LaunchError,
        ModelConfigError,
        DataError,
        CheckpointError,
        ScheduleError,
        UnsupportedMegatronVersion,
    )
    try:
        run_training(cfg)
    except user_errors as err:
        print(f"mimo-train: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
