"""torchrun worker: `megatron-puzzle ARGS` on every rank (a stage command launched on several processes)."""

import sys


def main():
    import torch

    torch.set_num_threads(1)
    from megatron_puzzle.cli import main as cli_main
    from megatron_puzzle.model.parallel import shutdown

    rc = cli_main(sys.argv[1:])
    shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())
