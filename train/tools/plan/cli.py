"""``mimo-plan``: what a recipe needs on a cluster before a single GPU is spent on it (see the package docstring)."""

import json
import math
import sys
from collections.abc import Sequence

from mimo.recipes.compose import load_config, recipe_argument_parser
from mimo.recipes.errors import ConfigError
from mimo.recipes.schema import MimoConfig
from mimo.train.tools.plan.planning import make_plan
from mimo.train.tools.plan.report import format_plan, plan_to_json
from mimo.train.tools.plan.settings import BACKENDS, GPUS, PlanError, PlannerSettings

PROG = "mimo-plan"


def smallest_world_size(cfg: MimoConfig) -> int:
    """The fewest ranks the layout's degrees allow (dense and expert groups both whole)."""
    p = cfg.parallel
    return math.lcm(p.tp * p.pp * p.cp, p.etp * p.ep * p.pp)


def main(argv: Sequence[str] | None = None) -> int:
    parser = recipe_argument_parser(
        PROG, "Memory, time and communication of a recipe on a cluster, before launching it."
    )
    parser.add_argument(
        "--world-size", type=int, default=None, help="GPUs of the run (default: the fewest the layout allows)"
    )
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    parser.add_argument(
        "--mfu",
        type=float,
        default=PlannerSettings.mfu,
        help=f"model-FLOPs utilisation for the time estimates (default {PlannerSettings.mfu})",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=PlannerSettings.backend,
        help="modules the activation estimate assumes: te (GPU with Transformer Engine) or local (mimo's CPU modules)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_intermixed_args(argv)
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu {args.mfu} must be in (0, 1]")
    try:
        cfg = load_config(args.overrides, config_name=args.config_name)
    except ConfigError as err:
        parser.error(str(err))
    world_size = args.world_size or smallest_world_size(cfg)
    try:
        plan = make_plan(
            cfg,
            world_size=world_size,
            gpu=GPUS[args.gpu],
            settings=PlannerSettings(mfu=args.mfu, backend=args.backend),
            recipe=args.config_name,
            overrides=args.overrides,
        )
    except PlanError as err:
        parser.error(str(err))
    if args.json:
        print(json.dumps(plan_to_json(plan), indent=2))
    else:
        print(format_plan(plan))
        if args.world_size is None:
            print(f"(world size {world_size}: the fewest GPUs this layout allows; pass --world-size for your cluster)")
    return 0 if plan.runs else 1


if __name__ == "__main__":
    sys.exit(main())
