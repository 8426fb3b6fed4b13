"""`python -m megatron_puzzle` is the `megatron-puzzle` command."""

import sys

if __name__ == "__main__":  # checkpoint writers spawn processes that re-import the main module
    from megatron_puzzle.cli import main

    sys.exit(main())
