#!/usr/bin/env bash
# Submit the Puzzle pipeline as a chain of SLURM jobs, each sized for its stage and started only when the
# one before it succeeded (--dependency=afterok): import (1 node), data (1 node), bld (NODES), score (NODES),
# then `run --from measure` (NODES: measure, search, realize, gkd, export). Every job runs puzzle.sbatch.
#
#   examples/slurm/submit_pipeline.sh CONFIG RUN_DIR HF_PARENT TOKENIZER [NODES]
#
#   CONFIG     run config (e.g. examples/configs/llama3.1-70b-h100-fp8.yaml)
#   RUN_DIR    run directory on a filesystem every node sees
#   HF_PARENT  the parent as an HF directory (e.g. /shared/models/Llama-3.1-70B-Instruct)
#   TOKENIZER  the tokenizer for the data stage (usually HF_PARENT)
#   NODES      nodes for the parallel stages: bld, score, gkd (default 4)
#
# Environment: SBATCH_ARGS (extra sbatch flags for every job, e.g. "--account=abc --partition=gpu"),
# IMPORT_TP (default 8), CONTAINER_IMAGE / CONTAINER_MOUNTS (see puzzle.sbatch). Resubmitting the same chain resumes: stages
# that finished are skipped by their done markers.
set -euo pipefail

if [[ $# -lt 4 ]]; then
    sed -n '2,20p' "$0" >&2
    exit 2
fi
config=$1 run_dir=$2 hf_parent=$3 tokenizer=$4 nodes=${5:-4}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
sbatch_script=$here/puzzle.sbatch
read -r -a extra <<<"${SBATCH_ARGS:-}"
mkdir -p logs/slurm   # SLURM does not create the --output directory

dep=()
submit() {  # submit NAME NODES COMMAND...; prints the job id and makes it the next job's dependency
    local name=$1 n=$2; shift 2
    local id
    id=$(sbatch --parsable -J "puzzle-$name" --nodes "$n" "${dep[@]}" "${extra[@]}" "$sbatch_script" "$@")
    id=${id%%;*}   # --parsable prints "id" or "id;cluster"
    echo "$name: job $id ($n node(s))"
    dep=(--dependency="afterok:$id")
}

if [[ -f "$run_dir/parent/done" ]]; then
    echo "import: $run_dir/parent is complete, not submitted"
else
    submit import 1 import-hf "$hf_parent" "$run_dir/parent" --tp "${IMPORT_TP:-8}"
fi
submit data 1 data --run-dir "$run_dir" --tokenizer "$tokenizer"
submit bld "$nodes" bld --run-dir "$run_dir" --config "$config"
submit score "$nodes" score --run-dir "$run_dir"
# measure, search and realize take minutes; GKD then uses every node of the same job.
submit finish "$nodes" run --config "$config" --run-dir "$run_dir" --from measure
