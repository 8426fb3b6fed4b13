#!/usr/bin/env bash
# Tokenize the corpus into RUN_DIR/data (train / calib / heldout Megatron indexed datasets); the
# tokenizing is spread over the NPROC ranks (CPU work), rank 0 writes.
#   examples/torchrun/data.sh RUN_DIR TOKENIZER [more data flags, see megatron-puzzle data --help]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# -ge 2 ]] || { echo "usage: $0 RUN_DIR TOKENIZER [FLAGS...]" >&2; exit 2; }
run_dir=$1 tokenizer=$2; shift 2
exec "$here/launch.sh" data --run-dir "$run_dir" --tokenizer "$tokenizer" "$@"
