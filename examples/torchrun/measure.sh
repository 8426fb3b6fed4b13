#!/usr/bin/env bash
# Per-variant costs for a scenario (preset name or YAML file). Analytic GPU profiles need one process;
# measured scenarios (device cpu/cuda) time variants on this machine. Rank 0 alone works.
#   examples/torchrun/measure.sh RUN_DIR SCENARIO [more measure flags]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# -ge 2 ]] || { echo "usage: $0 RUN_DIR SCENARIO [FLAGS...]" >&2; exit 2; }
run_dir=$1 scenario=$2; shift 2
NPROC=${NPROC:-1} exec "$here/launch.sh" measure --run-dir "$run_dir" --scenario "$scenario" "$@"
