"""Tensor parallelism on CPU: TP 2 under torchrun gives TP 1's logits; checkpoints cross TP sizes."""

import json

import torch
from safetensors.torch import load_file, save_file

from _models import REPO, every_variant_child, torchrun
from megatron_puzzle.arch.shapes import random_canonical

WORKER = REPO / "tests" / "workers" / "tp_worker.py"


def _run(tmp_path, tp, name, *extra):
    out = tmp_path / f"{name}.safetensors"
    torchrun(WORKER, tp, "--tp", str(tp), "--config", str(tmp_path / "cfg.json"),
             "--tokens", str(tmp_path / "tokens.json"), "--out", str(out), *extra)
    return load_file(out)["logits"]


def test_tp2_matches_tp1_and_checkpoints_cross_tp(tmp_path):
    cfg = every_variant_child()
    cfg.save(tmp_path / "cfg.json")
    save_file(random_canonical(cfg, seed=3), tmp_path / "w.safetensors")
    g = torch.Generator().manual_seed(0)
    (tmp_path / "tokens.json").write_text(json.dumps(torch.randint(0, cfg.vocab_size, (2, 24), generator=g).tolist()))
    w = ["--weights", str(tmp_path / "w.safetensors")]

    tp1 = _run(tmp_path, 1, "tp1", *w, "--save-ckpt", str(tmp_path / "ckpt_tp1"))
    tp2 = _run(tmp_path, 2, "tp2", *w, "--save-ckpt", str(tmp_path / "ckpt_tp2"))
    assert tp1.shape == (2, 24, cfg.vocab_size)
    assert (tp1 - tp2).abs().max().item() <= 1e-5

    # saved at TP 2, loaded at TP 1; saved at TP 1, loaded at TP 2: identical logits
    from_tp2 = _run(tmp_path, 1, "from_tp2", "--load-ckpt", str(tmp_path / "ckpt_tp2"))
    from_tp1 = _run(tmp_path, 2, "from_tp1", "--load-ckpt", str(tmp_path / "ckpt_tp1"))
    assert torch.equal(from_tp2, tp1)
    assert torch.equal(from_tp1, tp2)
