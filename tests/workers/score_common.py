"""Tiny parent, variant weights and held-out batches shared by the scoring tests and their torchrun worker."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _models import tiny_parent  # noqa: E402

from megatron_puzzle.arch import variant_from_name
from megatron_puzzle.arch.shapes import random_canonical, variant_shapes

# a reduced space: every kind of variant, on a 3-layer parent (heads 4, KV 2, FFN 96)
SPACE = [
    ["attn_kv2", "attn_kv1", "attn_linear", "ffn_96", "ffn_48", "ffn_no_op"],
    ["attn_kv1", "attn_no_op", "ffn_32", "ffn_linear"],
    ["attn_kv2", "attn_kv4", "ffn_no_op", "ffn_48"],
]


def parent_config():
    return tiny_parent(num_layers=3)


def parent_weights(cfg):
    return random_canonical(cfg, seed=11, std=0.08)


def variant_weights_for(cfg, parent_tensors, layer: int, name: str, seed: int):
    """Random weights of a variant; the parent's exact weights for the parent's own variant."""
    v = variant_from_name(name)
    shapes = variant_shapes(cfg, layer, v)
    own = cfg.blocks[layer]
    if v in (own.attention, own.ffn):
        return {k: parent_tensors[k].clone() for k in shapes}
    g = torch.Generator().manual_seed(seed)
    return {k: (1.0 + 0.1 * torch.randn(s, generator=g)) if k.endswith("norm.weight") else 0.08 * torch.randn(s, generator=g)
            for k, s in shapes.items()}


def write_library(root: Path, cfg, parent_tensors) -> None:
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    (root / "space.json").write_text(json.dumps({"layers": SPACE}))
    for layer, names in enumerate(SPACE):
        for j, name in enumerate(names):
            d = root / f"layer_{layer:03d}" / name
            d.mkdir(parents=True, exist_ok=True)
            w = variant_weights_for(cfg, parent_tensors, layer, name, seed=100 * layer + j)
            save_file({k: t.contiguous() for k, t in w.items()}, str(d / "weights.safetensors"))
            (d / "done").write_text("ok\n")


def heldout(cfg, batches: int = 2, batch_size: int = 2, seq_len: int = 16):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=g) for _ in range(batches)]


def child_with(cfg, layer: int, name: str):
    from megatron_puzzle.score import entry_block

    blocks = list(cfg.blocks)
    blocks[layer] = entry_block(cfg, layer, name)
    return cfg.with_blocks(blocks)

