#!/usr/bin/env bash
# Megatron-Core checkpoint -> HF DeciLM / Nemotron-NAS directory (loads with trust_remote_code=True).
#   examples/torchrun/export_hf.sh CHECKPOINT_DIR OUT_DIR [TP]   (TP default 1; NPROC defaults to TP)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# -ge 2 ]] || { echo "usage: $0 CHECKPOINT_DIR OUT_DIR [TP]" >&2; exit 2; }
tp=${3:-1}
NPROC=${NPROC:-$tp} exec "$here/launch.sh" export-hf "$1" "$2" --tp "$tp"
