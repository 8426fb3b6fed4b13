#!/usr/bin/env bash
# MIP architecture search over scores and costs (one process, CPU; no torchrun needed).
#   examples/torchrun/search.sh RUN_DIR CONSTRAINT [CONSTRAINT...] [-- more search flags]
#   e.g. examples/torchrun/search.sh runs/llama70b 'memory<=80GB' 'throughput>=1.8x'
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# -ge 2 ]] || { echo "usage: $0 RUN_DIR CONSTRAINT [CONSTRAINT...] [-- FLAGS...]" >&2; exit 2; }
run_dir=$1; shift
args=()
while [[ $# -gt 0 && "$1" != "--" ]]; do args+=(--constraint "$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
exec megatron-puzzle search --run-dir "$run_dir" "${args[@]}" "$@"
