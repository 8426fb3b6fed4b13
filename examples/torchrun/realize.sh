#!/usr/bin/env bash
# Assemble the child checkpoint of one search solution from the library.
#   examples/torchrun/realize.sh RUN_DIR [SOLUTION_INDEX] [more realize flags]
# One process by default; with --tensor-parallel T and --pp P launch NPROC=T*P (each writes its shard).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# -ge 1 ]] || { echo "usage: $0 RUN_DIR [SOLUTION_INDEX] [FLAGS...]" >&2; exit 2; }
run_dir=$1; shift
sol=(); if [[ $# -ge 1 && "$1" != --* ]]; then sol=(--solution "$1"); shift; fi
NPROC=${NPROC:-1} exec "$here/launch.sh" realize --run-dir "$run_dir" "${sol[@]}" "$@"
