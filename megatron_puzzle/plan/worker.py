"""The planning process: reads {"config": ..., "stages": [...]} on stdin, prints the plan as one JSON line.

Started by `plan.plan_config` so that the fake process group lives and dies in its own process.
Progress goes to stderr; a config the plan cannot use prints {"error": "..."}.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    # the distributed optimizer reads `.grad` of its shard views; harmless, and printed once per step
    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # parameter lists and configs of every build
    from .plan import PlanError, plan_in_process

    request = json.loads(sys.stdin.read())
    try:
        result = plan_in_process(request["config"], tuple(request["stages"]))
    except PlanError as e:
        result = {"error": str(e)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
