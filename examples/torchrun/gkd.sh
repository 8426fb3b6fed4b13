#!/usr/bin/env bash
# Global knowledge distillation (uptraining) of the child from the parent, data-parallel over all ranks
# (tensor-parallel inside each group as the config's parallelism section says).
#   examples/torchrun/gkd.sh RUN_DIR [CONFIG] [more gkd flags]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# -ge 1 ]] || { echo "usage: $0 RUN_DIR [CONFIG] [FLAGS...]" >&2; exit 2; }
run_dir=$1; shift
cfg=(); if [[ $# -ge 1 && "$1" != --* ]]; then cfg=(--config "$1"); shift; fi
exec "$here/launch.sh" gkd --run-dir "$run_dir" "${cfg[@]}" "$@"
