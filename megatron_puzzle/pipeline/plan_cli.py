"""`megatron-puzzle plan`: the memory plan of a run config (here, beside `run`, since it reads run configs;
the planning itself lives in the plan package, below the pipeline)."""

from __future__ import annotations

import argparse
import json

from ..cli import UserError
from . import config as run_config


def _plan(args: argparse.Namespace) -> int:
    from ..plan.plan import STAGES, PlanError, markdown, plan_config, verdict

    try:
        from .cli import chosen_profile

        cfg = run_config.load(args.config, profile=chosen_profile(args))
        result = plan_config(cfg, tuple(args.stages or STAGES))
    except (run_config.ConfigError, PlanError) as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(markdown(result))
    line = verdict(cfg, result)
    if line:
        print(f"does not fit: {line}")
        return 1
    return 0


def register(subparsers) -> None:
    from ..plan.plan import STAGES

    p = subparsers.add_parser(
        "plan", help="peak memory per GPU of every stage, from the code on fake tensors (no GPU needed)",
        description="Build each stage's modules for one rank at the config's TP/PP/DP on fake tensors, run one "
                    "step under a memory tracker and report the peak bytes per GPU (weights, gradients, optimizer "
                    "state, activations) and whether it fits the device. Exit status 1 when a stage does not fit.")
    p.add_argument("--config", required=True, help="run config (YAML), as for `megatron-puzzle run`")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--profile", choices=list(run_config.PROFILES), help="plan this profile under the config")
    p.add_argument("--quick", action="store_true", help="the same as --profile quick")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=None,
                   help=f"stages to plan (default: all of {', '.join(STAGES)})")
    p.set_defaults(func=_plan)
