#!/usr/bin/env bash
# GPU validation in one command, on one GPU in under 8 minutes (two GPUs add the TP parity check). Writes
# one JSON report: date, card, driver, versions, and every figure of the checks below.
#
#   tools/validate_gpu.sh [REPORT.json]        (default: gpu_validation-<date>.json)
#
# Checks (tests/gpu/test_gpu_paths.py; each adds its figures to the report):
#   - Transformer Engine specs, bf16 and FP8, on a model holding every variant kind; checkpoints written
#     by local specs load into TE specs and back
#   - FP8 GKD steps lower the loss; on-policy steps (gkd.unlikelihood) generate and train under FP8;
#     recompute gives the plain gradients with less memory (bf16, FP8)
#   - NVML: the handle of the card torch uses (by UUID), telemetry, the energy counter
#   - CUDA-event timing against wall clock
#   - measured costs in bf16 and FP8 (delayed and current scaling), decode replayed from CUDA graphs,
#     NVML energy per token; graphs vs eager decode; FP8 vs bf16 prefill; whole child vs sum of costs
#   - the analytic profile of this card (H100, H200, ...) against the measured times: an error table
#
# Meant for the project's Docker image (Dockerfile). Exit status: pytest's (0 all passed), 3 without CUDA,
# 124 when it ran out of time (VALIDATE_TIMEOUT_S, default 480 s).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

report=${1:-gpu_validation-$(date +%Y%m%d-%H%M%S).json}
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to torch: nothing to validate (tests/gpu skip on CPU)" >&2
    exit 3
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || true

# The checks, in the order they run (the cheap ones first, so a failure shows early).
GPU_TESTS=(
    tests/gpu/test_gpu_paths.py::test_nvml_telemetry_samples_the_working_gpu
    tests/gpu/test_gpu_paths.py::test_cuda_event_timing_matches_wall_clock
    tests/gpu/test_gpu_paths.py::test_te_specs_load_local_checkpoint_and_match
    tests/gpu/test_gpu_paths.py::test_fp8_gkd_steps_lower_the_loss
    tests/gpu/test_gpu_paths.py::test_on_policy_steps_generate_and_train_under_fp8
    tests/gpu/test_gpu_paths.py::test_recompute_matches_plain_backward_with_less_memory
    tests/gpu/test_gpu_paths.py::test_measured_costs_with_cuda_graphs_and_energy
    tests/gpu/test_gpu_paths.py::test_graphs_beat_eager_decode_and_fp8_beats_bf16_prefill
    tests/gpu/test_gpu_paths.py::test_whole_child_time_is_the_sum_of_its_costs
    tests/gpu/test_gpu_paths.py::test_analytic_profile_against_measured_variant_times
    tests/gpu/test_gpu_paths.py::test_bf16_tensor_parallel_parity
)

export PUZZLE_GPU_REPORT=$(realpath -m "$report")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
status=0
started=$(date +%s)
timeout "${VALIDATE_TIMEOUT_S:-480}" python -m pytest "${GPU_TESTS[@]}" -v -rs -p no:cacheprovider \
    --junitxml="${PUZZLE_GPU_REPORT%.json}.junit.xml" || status=$?
seconds=$(( $(date +%s) - started ))

# One JSON report: the tests' figures plus each check's outcome and the run's status and duration.
python - "$PUZZLE_GPU_REPORT" "${PUZZLE_GPU_REPORT%.json}.junit.xml" "$status" "$seconds" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

report, junit, status, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = json.loads(report.read_text()) if report.exists() else {"results": {}}
outcomes = {}
if junit.exists():
    for case in ET.parse(junit).iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        outcomes[case.get("name")] = {"outcome": kind, "seconds": float(case.get("time", 0))}
data.update(exit_status=status, seconds=seconds, outcomes=outcomes)
tmp = report.with_suffix(".tmp")
tmp.write_text(json.dumps(data, indent=2) + "\n")
tmp.replace(report)
EOF
echo "report: $PUZZLE_GPU_REPORT"
cat "$PUZZLE_GPU_REPORT"
[[ $status -eq 124 ]] && echo "validation stopped after ${VALIDATE_TIMEOUT_S:-480} s" >&2
exit $status
