"""torchrun worker: `realize RUN SOLUTION TP` on a prepared run directory (evaluation off)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    import torch

    torch.set_num_threads(1)
    from megatron_puzzle.model.parallel import shutdown
    from megatron_puzzle.pipeline.realize import realize

    realize(sys.argv[1], int(sys.argv[2]), evaluate=False, force=True, tensor_parallel=int(sys.argv[3]))
    shutdown()


if __name__ == "__main__":
    main()
