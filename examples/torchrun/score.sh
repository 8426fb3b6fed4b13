#!/usr/bin/env bash
# Replace-1-block scoring of every library entry; entries are spread over all ranks.
#   examples/torchrun/score.sh RUN_DIR [more score flags]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# -ge 1 ]] || { echo "usage: $0 RUN_DIR [FLAGS...]" >&2; exit 2; }
run_dir=$1; shift
exec "$here/launch.sh" score --run-dir "$run_dir" "$@"
