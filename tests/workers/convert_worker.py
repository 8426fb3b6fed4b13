"""torchrun worker: one `megatron-puzzle` command (import-hf / export-hf) on every rank."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    import torch

    torch.set_num_threads(1)
    from megatron_puzzle.cli import main as cli_main
    from megatron_puzzle.model.parallel import shutdown

    rc = cli_main(sys.argv[1:])
    shutdown()
    sys.exit(rc)


if __name__ == "__main__":
    main()
