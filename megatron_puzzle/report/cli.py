"""`megatron-puzzle report`: evaluate parent, child and baselines side by side; write the run's report.

Settings: the `report` and `baselines` sections of RUN/config.yaml (or of --config).
Writes RUN/report.json, RUN/report.md, RUN/*.png and RUN/baselines/<name>/.
"""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from .config import load_report_config
    from .make import make_report

    try:  # settings are checked before any work; an error inside the report is a bug and keeps its traceback
        load_report_config(args.run_dir, args.config)
    except (ValueError, TypeError) as e:
        raise UserError(f"bad report setting: {e}") from None
    report = make_report(args.run_dir, args.config)
    g = report["goal"]
    print(f"report: child at {g['reached_decode_speedup']:.2f}x decode throughput keeps "
          f"{g['reached_accuracy_retained']:.1%} of the parent's next-token accuracy "
          f"(goal {'met' if g['met'] else 'not met'}); see {args.run_dir}/report.md")
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="final evaluation: parent vs child vs baselines, report.md/json and plots",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run directory (parent/, data/, child/ or gkd/final, ...)")
    p.add_argument("--config", help="YAML run config with `report` / `baselines` sections (default RUN/config.yaml)")
    p.set_defaults(func=_run)
