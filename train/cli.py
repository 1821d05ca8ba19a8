"""``mimo-train`` / ``python -m mimo.train``: compose the recipe, then train."""

import sys
import warnings
from typing import Optional, Sequence

from mimo.recipes import ConfigError, load_config, recipe_argument_parser


# Expected on machines without Transformer Engine/Apex (every CPU run): megatron-core says so at import time.
EXPECTED_WARNINGS = (r".*(Transformer Engine|Apex).* not installed", r".*torch\.distributed\.\w+` is deprecated")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = recipe_argument_parser("mimo-train", "Pre-train a MiMo-V2-Flash-shaped model with megatron-core.")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.overrides, config_name=args.config_name)
    except ConfigError as err:
        parser.error(str(err))
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    from mimo.train.loop import run_training  # heavy imports only once the config is known to be valid

    run_training(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
