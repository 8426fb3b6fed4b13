"""`megatron-puzzle init` and `megatron-puzzle bld`: the block library of a run.

    megatron-puzzle init --run-dir RUN [--config FILE]     training-free initial weights (RUN/init)
    megatron-puzzle bld  --run-dir RUN [--config FILE]     init (if needed) + BLD (RUN/library)
    torchrun --nproc-per-node 2 $(which megatron-puzzle) bld --run-dir RUN    variants spread over 2 ranks
    torchrun --nproc-per-node 2 $(which megatron-puzzle) bld --run-dir RUN --pp 2    the parent split in 2 stages

The config is YAML with sections `search_space`, `init` and `bld` (docs/bld.md);
without --config, RUN/config.yaml is read when present. A killed run resumes when
the same command is run again.
"""

from __future__ import annotations

import argparse

from ..cli import add_pipeline_arguments


def _run(args: argparse.Namespace, init_only: bool) -> int:
    from ..cli import UserError
    from ..utils.io import sweep_before_start
    from .bld_run import load_run_config, run_bld, run_init

    sweep_before_start(args.run_dir)
    try:  # a bad config section is the user's to fix; errors while building keep their tracebacks
        rc = load_run_config(args.run_dir, args.config)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    if args.no_progress:
        rc.bld.progress = False
    for name in ("pipeline_parallel", "pp_first_stage_layers", "pp_last_stage_layers"):
        if getattr(args, name, None) is not None:
            setattr(rc.bld, name, getattr(args, name))
    if rc.bld.pipeline_parallel < 1:
        raise UserError(f"--pp must be a positive integer, got {rc.bld.pipeline_parallel}")
    if init_only:
        run_init(args.run_dir, rc)
        report = None
    else:
        report = run_bld(args.run_dir, rc)  # LibraryError: one line, by the CLI
    if report is not None:
        t = report.throughput()
        print(f"bld: {report.entries_written} entries written, {report.steps_run} steps, "
              f"{t['tokens_per_s']:.0f} tokens/s, {t['variant_tokens_per_s']:.0f} variant-tokens/s, "
              f"parent forward {100 * t['parent_forward_share']:.0f}% of the time")
    return 0


def register(sub) -> None:
    for name, init_only, help_ in (
        ("init", True, "training-free initial weights of every search-space variant (RUN/init)"),
        ("bld", False, "blockwise local distillation: train the block library (RUN/library)"),
    ):
        p = sub.add_parser(name, help=help_, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--run-dir", required=True, help="run directory with parent/ and data/")
        p.add_argument("--config", help="YAML run config (sections search_space, init, bld)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if not init_only:  # init runs on the whole parent
            add_pipeline_arguments(p, "the parent split over this many stages, each training the entries of its "
                                      "layers (default: bld.pipeline_parallel)", default=None)
        p.set_defaults(func=lambda a, _i=init_only: _run(a, _i))
