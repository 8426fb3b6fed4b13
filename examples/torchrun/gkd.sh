#!/usr/bin/env bash
# Global knowledge distillation (uptraining) of the child from the parent on Megatron-Core's engine:
# world = TP x PP x DP (--tp, --pp; data-parallel over the remaining ranks, distributed optimizer when DP > 1).
#   examples/torchrun/gkd.sh RUN_DIR [CONFIG] [more gkd flags]
#   e.g. examples/torchrun/gkd.sh RUN_DIR --tp 2 --pp 2 --micro-batch-size 1   (4 processes per replica)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# -ge 1 ]] || { echo "usage: $0 RUN_DIR [CONFIG] [FLAGS...]" >&2; exit 2; }
run_dir=$1; shift
cfg=(); if [[ $# -ge 1 && "$1" != --* ]]; then cfg=(--config "$1"); shift; fi
exec "$here/launch.sh" gkd --run-dir "$run_dir" "${cfg[@]}" "$@"
