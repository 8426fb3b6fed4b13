"""GKD on Megatron-Core's engine on GPUs (skipped on CPU by tests/conftest.py; never run yet:
no GPU has been available). Each run is `tests/workers/gkd_worker.py` under torchrun, one
process per GPU, on the tests' tiny parent and a child holding every variant kind.

- bf16 (Transformer Engine specs, fused attention and norms, teacher in bf16) follows an fp32
  single-GPU run of the same steps within bf16 rounding, with DDP + the distributed optimizer
  (DP 2), pipeline parallelism (PP 2) and, on 4 GPUs, TP 2 x PP 2 with sequence parallelism.
- FP8 for the student (delayed and current scaling, Hopper or newer) stays within FP8 noise
  of the same curve.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from _models import REPO, torchrun

sys.path.insert(0, str(REPO / "tests" / "workers"))

pytestmark = pytest.mark.gpu
WORKER = REPO / "tests" / "workers" / "gkd_worker.py"
BASE = dict(steps=3, save_interval=0, batch_size=4, micro_batch_size=2, seq_len=32, lr=3e-3, min_lr=3e-4, warmup=2,
            eval_tokens=0, progress=False)


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    from gkd_worker import make_run

    from megatron_puzzle.model.parallel import init_distributed

    init_distributed(1)
    return make_run(tmp_path_factory.mktemp("gkd_gpu") / "base")


def _run(base: Path, dest: Path, nproc: int, config: dict) -> list[dict[str, float]]:
    for name in ("parent", "child", "data"):
        shutil.copytree(base / name, dest / name)
    torchrun(WORKER, nproc, "--tp", str(config.get("tp", 1)), "--pp", str(config.get("pp", 1)),
             "--run-dir", str(dest), "--config", json.dumps(config), "--out", str(dest / "out.json"), timeout=600)
    with open(dest / "gkd" / "log.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _layouts() -> list[dict]:
    n = _gpus()
    out = []
    if n >= 2:
        out += [{"batch_size": 2, "micro_batch_size": 1}, {"pp": 2}]  # DP 2 (distributed optimizer), PP 2
    if n >= 4:
        out += [{"tp": 2, "pp": 2, "sequence_parallel": True}]
    return out or [{}]


@pytest.mark.parametrize("fp8", [None, "delayed", "tensorwise"])
def test_gkd_engine_bf16_and_fp8_follow_fp32(base_run, tmp_path, fp8):
    if fp8 and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("FP8 needs a Hopper or newer GPU")
    ref = _run(base_run, tmp_path / "fp32", 1, {**BASE, "dtype": "float32", "teacher_dtype": "float32"})
    precision = {"dtype": "bfloat16", "teacher_dtype": "bfloat16"}
    if fp8:
        precision.update(fp8="hybrid", fp8_recipe=fp8)
    tol = 0.05 if fp8 else 0.02  # relative, on each logged loss term
    for i, layout in enumerate(_layouts()):
        nproc = layout.get("tp", 1) * layout.get("pp", 1) * (2 if layout.get("batch_size") == 2 else 1)
        rows = _run(base_run, tmp_path / f"run{i}", nproc, {**BASE, **precision, **layout})
        assert len(rows) == len(ref)
        for a, b in zip(ref, rows):
            for key in ("loss", "cosine", "kl"):
                assert abs(a[key] - b[key]) <= tol * abs(a[key]), (layout, fp8, a["step"], key, a[key], b[key])
