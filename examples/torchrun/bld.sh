#!/usr/bin/env bash
# Blockwise local distillation of every library variant; the variants are spread over all ranks.
#   examples/torchrun/bld.sh RUN_DIR [CONFIG] [more bld flags]   (NPROC default: all visible GPUs)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# -ge 1 ]] || { echo "usage: $0 RUN_DIR [CONFIG] [FLAGS...]" >&2; exit 2; }
run_dir=$1; shift
cfg=(); if [[ $# -ge 1 && "$1" != --* ]]; then cfg=(--config "$1"); shift; fi
exec "$here/launch.sh" bld --run-dir "$run_dir" "${cfg[@]}" "$@"
