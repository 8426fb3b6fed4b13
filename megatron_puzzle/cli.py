"""The `megatron-puzzle` command.

Each stage module registers its own subcommand through `register(subparsers)`;
this file only lists them. Errors the user can fix (`UserError`) print one line and
exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
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
    "megatron_puzzle.plan.cli",  # plan: per-stage memory per GPU
]


class UserError(Exception):
    """Bad input the user can fix; printed as one line, exit code 2."""


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
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"megatron-puzzle {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        # Input problems surfaced by lower layers (bad paths, malformed configs).
        if args.verbose:
            raise
        print(f"megatron-puzzle {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":  # `python -m megatron_puzzle.cli`: use the package's module, not a __main__ copy
    from megatron_puzzle.cli import main as _main

    sys.exit(_main())
