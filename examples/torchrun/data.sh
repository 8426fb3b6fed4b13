#!/usr/bin/env bash
# Tokenize the corpus into RUN_DIR/data (train / calib / heldout shards). CPU work: one process.
#   examples/torchrun/data.sh RUN_DIR TOKENIZER [more data flags, see megatron-puzzle data --help]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# -ge 2 ]] || { echo "usage: $0 RUN_DIR TOKENIZER [FLAGS...]" >&2; exit 2; }
run_dir=$1 tokenizer=$2; shift 2
NPROC=1 exec "$here/launch.sh" data --run-dir "$run_dir" --tokenizer "$tokenizer" "$@"
