"""Tiny model configs shared by the tests (built in code; nothing is downloaded)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from megatron_puzzle.arch import AttentionVariant as A, BlockConfig, FFNVariant as F, ModelConfig
from megatron_puzzle.model.parallel import free_port

REPO = Path(__file__).resolve().parents[1]


def tiny_parent(num_layers: int = 4, tie: bool = False, **kw) -> ModelConfig:
    base = dict(vocab_size=128, hidden_size=64, num_layers=num_layers, num_attention_heads=4, num_kv_heads=2,
                intermediate_size=96, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=128,
                tie_word_embeddings=tie)
    base.update(kw)
    return ModelConfig(**base)


def built_tiny_parent(layers: int, **shape):
    """A tiny parent of `layers` layers built in Megatron-Core with seeded random weights: (model in eval
    mode, its canonical tensors)."""
    from megatron_puzzle.arch.shapes import random_canonical
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.model.gpt import build_model

    cfg = tiny_parent(num_layers=layers, **shape)
    tensors = random_canonical(cfg, seed=1, std=0.1)
    model = build_model(cfg)
    load_canonical(model, tensors)
    return model.eval(), tensors


def every_variant_child(tie: bool = False) -> ModelConfig:
    """A child holding every variant kind: full, fewer KV heads (also fewer than TP=2),
    linear and no-op attention; narrower, linear and no-op FFN."""
    blocks = [
        BlockConfig(A("full", 2), F("full", 96)),
        BlockConfig(A("full", 1), F("full", 48)),
        BlockConfig(A("linear"), F("linear")),
        BlockConfig(A("no_op"), F("full", 32)),
        BlockConfig(A("full", 4), F("no_op")),
        BlockConfig(A("full", 2), F("linear")),
    ]
    return tiny_parent(num_layers=len(blocks), tie=tie).with_blocks(blocks)


def torchrun(script: str | Path, nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Launch `script` under torchrun with `nproc` CPU processes on a fresh port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
