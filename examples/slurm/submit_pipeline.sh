#!/usr/bin/env bash
# Submit the Puzzle pipeline as a chain of SLURM jobs, each sized for its stages and started only when
# the one before it succeeded (--dependency=afterok). Every job runs `megatron-puzzle run` on the same
# config and run directory, stopping after its last stage (--until); `run` skips finished stages, so
# each job only does its own part, and resubmitting the chain resumes a preempted or failed run.
#
#   examples/slurm/submit_pipeline.sh CONFIG RUN_DIR [NODES]
#
#   CONFIG   run config (e.g. examples/configs/llama3.1-70b-h100-fp8.yaml); its `parent` names the HF model
#   RUN_DIR  run directory on a filesystem every node sees
#   NODES    nodes for the parallel stages (bld, score, gkd); default 4
#
# Jobs: prepare (1 node: import, data), bld (NODES: init, bld), score (NODES),
#       finish (NODES: measure, search, realize, gkd, export, eval).
# Environment: SBATCH_ARGS (extra sbatch flags for every job, e.g. "--account=abc --partition=gpu"),
# CONTAINER_IMAGE / CONTAINER_MOUNTS (see puzzle.sbatch).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,18p' "$0" >&2
    exit 2
fi
config=$1 run_dir=$2 nodes=${3:-4}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
sbatch_script=$here/puzzle.sbatch
read -r -a extra <<<"${SBATCH_ARGS:-}"
mkdir -p logs/slurm   # SLURM does not create the --output directory

dep=()
submit() {  # submit NAME NODES [--until STAGE]; prints the job id and makes it the next job's dependency
    local name=$1 n=$2; shift 2
    local id
    id=$(sbatch --parsable -J "puzzle-$name" --nodes "$n" "${dep[@]}" "${extra[@]}" "$sbatch_script" \
         run --config "$config" --run-dir "$run_dir" "$@")
    id=${id%%;*}   # --parsable prints "id" or "id;cluster"
    echo "$name: job $id ($n node(s))"
    dep=(--dependency="afterok:$id")
}

submit prepare 1 --until data
submit bld "$nodes" --until bld
submit score "$nodes" --until score
submit finish "$nodes"
