#!/usr/bin/env bash
# GPU validation in one command: runs tests/gpu (Transformer Engine specs, FP8 GKD steps, NVML telemetry,
# CUDA-event timing, analytic profile vs measured timings, bf16 TP parity when 2+ GPUs are visible) and
# writes a JSON report with the date, card and versions.
#
#   tools/validate_gpu.sh [REPORT.json]        (default: gpu_validation-<date>.json)
#
# Meant for the project's Docker image (NGC PyTorch base). Takes under 8 minutes on one H100.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

report=${1:-gpu_validation-$(date +%Y%m%d-%H%M%S).json}
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to torch: nothing to validate (tests/gpu skip on CPU)" >&2
    exit 3
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || true

export PUZZLE_GPU_REPORT=$(realpath -m "$report")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
status=0
timeout "${VALIDATE_TIMEOUT_S:-480}" python -m pytest tests/gpu -v -rs -p no:cacheprovider || status=$?
if [[ -f "$PUZZLE_GPU_REPORT" ]]; then
    echo "report: $PUZZLE_GPU_REPORT"
    cat "$PUZZLE_GPU_REPORT"
fi
[[ $status -eq 124 ]] && echo "validation stopped after ${VALIDATE_TIMEOUT_S:-480} s" >&2
exit $status
