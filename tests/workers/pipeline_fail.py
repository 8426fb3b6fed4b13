"""torchrun worker: `megatron-puzzle run ARGS` where rank FAIL_RANK raises in the middle of the score stage.

The failing rank's first score cache write raises (a bug, not bad input), after it has scored one
entry and while the other rank is still scoring; the test checks that the whole launch stops.
"""

import os
import sys
import time


def main():
    fail_rank = int(os.environ["FAIL_RANK"])
    if int(os.environ["RANK"]) == fail_rank:
        from megatron_puzzle.score import stage

        def broken(*args, **kwargs):
            print(f"FAILING rank {fail_rank} at {time.time():.3f}", file=sys.stderr, flush=True)
            raise RuntimeError("injected failure in the score stage")

        stage.write_cached = broken
    from megatron_puzzle.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
