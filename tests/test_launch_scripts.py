"""The examples/ launch templates run real jobs: torchrun scripts on 2 CPU processes, SLURM templates rendered.

The torchrun test imports a tiny Llama (saved here with transformers) at TP 2 through the example
script and exports it with tools/export_megatron_to_hf.py; the exported weights must be exactly the
original ones. The SLURM
templates run with stand-in `srun`/`scontrol`/`sbatch` commands that record what they were asked to do.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _models import REPO

TORCHRUN_DIR = REPO / "examples" / "torchrun"
SLURM_DIR = REPO / "examples" / "slurm"
SCRIPTS = sorted(TORCHRUN_DIR.glob("*.sh")) + sorted(SLURM_DIR.glob("*.sh")) + sorted(SLURM_DIR.glob("*.sbatch")) \
    + sorted((REPO / "tools").glob("*.sh"))


def _env(tmp_path: Path, **extra) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="",
                TORCHRUN=f"{shlex.quote(sys.executable)} -m torch.distributed.run", LOG_DIR=str(tmp_path / "logs"),
                **extra)


def _run(cmd: list[str], env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def _tiny_llama(path: Path) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms are ones at init: randomise so a dropped norm would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_torchrun_script_imports_at_tp2_and_tool_exports(tmp_path):
    """import_hf.sh with 2 processes (TP 2), then tools/export_megatron_to_hf.py in one process (TP 1):
    the exported HF weights are exactly the original ones."""
    reference = _tiny_llama(tmp_path / "hf")
    env = _env(tmp_path)
    _run(["bash", str(TORCHRUN_DIR / "import_hf.sh"), str(tmp_path / "hf"), str(tmp_path / "ckpt"), "2"], env)
    assert (tmp_path / "ckpt" / "done").exists()
    _run([sys.executable, str(REPO / "tools" / "export_megatron_to_hf.py"), str(tmp_path / "ckpt"), str(tmp_path / "out")], env)
    exported = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        exported.update(load_file(f))
    assert set(exported) == set(reference)
    for name, t in reference.items():
        torch.testing.assert_close(exported[name].float(), t.float(), rtol=0, atol=0, msg=name)
    logs = list((tmp_path / "logs").glob("import-hf-*.log"))
    assert logs and "TP 2" in logs[0].read_text(), "the launcher keeps one log per launch, with every rank's output"
