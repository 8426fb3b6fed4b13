#!/usr/bin/env bash
# Run one megatron-puzzle command on this node with torchrun:
#   examples/torchrun/launch.sh COMMAND [ARGS...]
#   e.g. NPROC=8 examples/torchrun/launch.sh bld --run-dir runs/llama8b --config examples/configs/llama3.1-8b-h100.yaml
#
# Environment (all optional):
#   NPROC        processes on this node (default: visible GPUs, or 1 without GPUs)
#   TORCHRUN     the launcher command (default: torchrun; e.g. "python -m torch.distributed.run")
#   LOG_DIR      where this launch's log goes (default: logs/); one file per launch, all ranks
# Every stage is resumable: rerunning the same command continues where a killed one stopped.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 COMMAND [ARGS...]   (COMMAND: a megatron-puzzle subcommand, see megatron-puzzle --help)" >&2
    exit 2
fi
command_name=$1

gpu_count() {
    # Visible GPUs: CUDA_VISIBLE_DEVICES when set, else nvidia-smi, else 0.
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --list-gpus 2>/dev/null | wc -l
    else
        echo 0
    fi
}

nproc=${NPROC:-$(gpu_count)}
[[ "$nproc" -ge 1 ]] || nproc=1
read -r -a torchrun <<<"${TORCHRUN:-torchrun}"
log_dir=${LOG_DIR:-logs}
mkdir -p "$log_dir"
log_file="$log_dir/${command_name}-$(date +%Y%m%d-%H%M%S)-$$.log"

# One CPU thread per process unless the user chose otherwise: N processes share the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Fail fast (instead of hanging) when one rank dies inside a collective.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

echo "launching $nproc process(es): megatron-puzzle $* (log: $log_file)" >&2
# --standalone: a private rendezvous on a free local port, so several single-node jobs can share a machine.
"${torchrun[@]}" --standalone --nproc-per-node "$nproc" -m megatron_puzzle.cli "$@" 2>&1 | tee "$log_file"
exit "${PIPESTATUS[0]}"
