"""The `megatron-puzzle` command.

Each stage module registers its own subcommand through `register(subparsers)`;
this file only lists them. Errors the user can fix (`UserError`, the stages' input
errors listed in INPUT_ERRORS, missing or existing paths) print one line and exit
with status 2; anything else is a bug and keeps its traceback. Under torchrun the
failing rank exits at once, so the launcher stops the other ranks.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Modules that define `register(subparsers)`; each adds one or more subcommands.
COMMAND_MODULES = [  # in pipeline order, as `--help` lists them
    "megatron_puzzle.pipeline.cli",  # run (every stage), realize
    "megatron_puzzle.convert.cli",  # import-hf, export-hf
    "megatron_puzzle.data.cli",
    "megatron_puzzle.distill.bld_cli",  # init, bld
    "megatron_puzzle.score.cli",
    "megatron_puzzle.cost.cli",  # measure
    "megatron_puzzle.search.cli",
    "megatron_puzzle.distill.gkd_cli",
    "megatron_puzzle.report.cli",
    "megatron_puzzle.pipeline.plan_cli",  # plan: per-stage memory per GPU
]


class UserError(Exception):
    """Bad input the user can fix; printed as one line, exit code 2."""


# The stages' own bad-input errors (module, class): printed as one line like UserError. Looked up only in
# modules already imported (an error class whose module was never loaded cannot have been raised), so this
# list imports nothing. A plain ValueError is not here: it may be a bug and keeps its traceback.
INPUT_ERRORS = (
    ("megatron_puzzle.utils.errors", "InputError"),
    ("megatron_puzzle.pipeline.config", "ConfigError"),
    ("megatron_puzzle.pipeline.realize", "RealizeError"),
    ("megatron_puzzle.arch.block_config", "BlockConfigError"),
    ("megatron_puzzle.library.store", "LibraryError"),
    ("megatron_puzzle.score.library", "LibraryError"),
    ("megatron_puzzle.score.stage", "ScoreError"),
    ("megatron_puzzle.convert.hf_io", "HFCheckpointError"),
    ("megatron_puzzle.data.ztext", "ZTextError"),
    ("megatron_puzzle.data.shards", "CorpusTooSmallError"),
    ("megatron_puzzle.search.problem", "SearchError"),
    ("megatron_puzzle.cost.costs", "CostsError"),
    ("megatron_puzzle.cost.gpus", "UnknownGPUError"),
    ("megatron_puzzle.cost.scenario", "ScenarioError"),
    ("megatron_puzzle.cost.jobs", "MeasureError"),
    ("megatron_puzzle.model.gpt", "GPUOnlyOptionError"),
    ("megatron_puzzle.model.gpt", "LayoutError"),
    ("megatron_puzzle.plan.plan", "PlanError"),
)


def add_pipeline_arguments(p: argparse.ArgumentParser, what: str, default: int | None = 1) -> None:
    """--pp/--pipeline-parallel and the uneven split's stage sizes, for a command that splits a model over
    pipeline stages (`what`: what each stage does with its layers)."""
    p.add_argument("--pp", "--pipeline-parallel", dest="pipeline_parallel", type=int, default=default,
                   help=f"pipeline-parallel size: {what} (launch TP x PP x DP processes)")
    p.add_argument("--pp-first-stage-layers", type=int, default=None,
                   help="layers on the first pipeline stage (uneven split)")
    p.add_argument("--pp-last-stage-layers", type=int, default=None,
                   help="layers on the last pipeline stage (uneven split)")


def is_input_error(e: BaseException) -> bool:
    """True for bad input the user can fix (one line), False for a bug (a traceback)."""
    if isinstance(e, (UserError, FileNotFoundError, FileExistsError, NotADirectoryError)):
        return True
    for module, name in INPUT_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            return True
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-puzzle",
        description="Compress an LLM into a faster heterogeneous child with the Puzzle method.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


# Megatron-Core warnings that say nothing about this project's use of it.
_NOISE = (
    "Apex is not installed",  # the local (torch) norms and optimizers are used on purpose
    "Transformer Engine and Apex are not installed",
    "full scope is deprecated",  # a default of TransformerConfig, not set by us
)


def main(argv: list[str] | None = None) -> int:
    import warnings

    for text in _NOISE:
        warnings.filterwarnings("ignore", message=f".*{text}")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:  # Megatron's indexed datasets log every index they open
        logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    from .utils.host_memory import keep_freed_memory

    keep_freed_memory()  # CPU runs: reuse freed memory instead of page-faulting it in every step
    from .utils.preempt import Preempted

    groups_before = _process_groups_up()
    try:
        rc = args.func(args)
    except Preempted as e:  # state saved on every rank: exit 0 so a scheduler requeues and the rerun resumes
        print(f"megatron-puzzle {args.command}: {e}", file=sys.stderr)
        return 0
    except Exception as e:
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if not is_input_error(e) or args.verbose:
            if not launched:
                raise
            import traceback

            traceback.print_exc()
            _exit_now(1)
        where = f" (rank {os.environ.get('RANK')})" if launched else ""
        line = f"megatron-puzzle {args.command}{where}: error: {e}"
        if launched:
            # ranks share one stderr pipe: one write of the whole line (atomic below PIPE_BUF) keeps
            # another rank's line from landing inside it
            sys.stderr.flush()
            os.write(2, (line + "\n").encode())
            _exit_now(2)
        print(line, file=sys.stderr)
        return 2
    finally:
        if not groups_before and _process_groups_up():
            # while the interpreter is whole: a gloo group left to the interpreter's exit can abort a rank
            # ("terminate called without an active exception") after its command succeeded. Every rank
            # gets here only past its stage's last collective; groups a caller started stay theirs.
            from .model import parallel

            parallel.shutdown()
    return int(rc or 0)


def _process_groups_up() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _exit_now(code: int) -> None:
    """Under torchrun, leave at once rather than tear down process groups (which waits on the other ranks):
    the launcher sees this rank fail and stops the others, none left waiting in a collective."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":  # `python -m megatron_puzzle.cli`: use the package's module, not a __main__ copy
    from megatron_puzzle.cli import main as _main

    sys.exit(_main())
