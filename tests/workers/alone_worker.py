"""torchrun worker: the launch's process group, shut down, then rank 0 alone in a world of one."""

import sys

import torch.distributed as dist

from megatron_puzzle.model import parallel


def main():
    parallel.init_process_group(timeout_min=1)
    assert parallel.world_size() == 2
    parallel.barrier()
    r = parallel.rank()
    parallel.shutdown()
    if r == 0:
        with parallel.alone():
            assert (parallel.rank(), parallel.world_size()) == (0, 1)  # before the group, despite RANK/WORLD_SIZE
            parallel.init_process_group(timeout_min=1)
            assert dist.get_world_size() == 1
            parallel.barrier()
            parallel.shutdown()
        print("ALONE OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
