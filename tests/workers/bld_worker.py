"""torchrun worker for the BLD rank-count test: `megatron-puzzle bld` on a prepared run directory."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    import torch

    torch.set_num_threads(1)
    from megatron_puzzle.cli import main as cli_main
    from megatron_puzzle.model.parallel import shutdown

    rc = cli_main(["bld", "--run-dir", sys.argv[1], "--config", sys.argv[2], "--no-progress"])
    shutdown()
    sys.exit(rc)


if __name__ == "__main__":
    main()
