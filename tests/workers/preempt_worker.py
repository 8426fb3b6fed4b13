"""A rank of a loop that stops on preemption (tests/test_preempt.py): steps until `preempt.requested()`.

Writes OUT/pid<rank> at start, OUT/progress<rank> (the step) as it goes, OUT/result<rank>.json at the end.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from megatron_puzzle.utils import preempt

if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    preempt.install()
    (out / f"pid{rank}").write_text(str(os.getpid()))
    step, deadline = 0, time.monotonic() + 60
    while not preempt.requested():
        step += 1
        (out / f"progress{rank}").write_text(str(step))
        time.sleep(0.01)
        if time.monotonic() > deadline:
            break
    dist.barrier()  # every rank reached the end: none is left waiting in an all-reduce
    (out / f"result{rank}.json").write_text(json.dumps({"step": step, "local": preempt.local_request(),
                                                        "stopped": time.monotonic() <= deadline}))
    dist.destroy_process_group()
