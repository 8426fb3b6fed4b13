#!/usr/bin/env bash
# HF checkpoint (directory or .gguf) -> Megatron-Core checkpoint, one process per TP rank.
#   examples/torchrun/import_hf.sh HF_PATH OUT_DIR [TP]      (TP default 1; NPROC defaults to TP)
# The checkpoint loads later at any TP size, so TP here only decides how the import is spread.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# -ge 2 ]] || { echo "usage: $0 HF_PATH OUT_DIR [TP]" >&2; exit 2; }
tp=${3:-1}
NPROC=${NPROC:-$tp} exec "$here/launch.sh" import-hf "$1" "$2" --tp "$tp"
