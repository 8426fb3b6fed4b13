#!/usr/bin/env bash
# The whole pipeline from one YAML config on one node (import, data, bld, score, measure, search, realize, gkd, export).
#   examples/torchrun/run.sh CONFIG [RUN_DIR] [more run flags, e.g. --from bld, --quick]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# -ge 1 ]] || { echo "usage: $0 CONFIG [RUN_DIR] [FLAGS...]" >&2; exit 2; }
config=$1; shift
rd=(); if [[ $# -ge 1 && "$1" != --* ]]; then rd=(--run-dir "$1"); shift; fi
exec "$here/launch.sh" run --config "$config" "${rd[@]}" "$@"
