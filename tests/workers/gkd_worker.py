"""GKD test helpers and torchrun worker.

`make_run(run_dir)` builds a tiny run directory (parent, child, token shards) in code.
As a script (under torchrun) it checks the vocab-parallel losses on fixed logits and
runs a few GKD steps at the given TP size, writing both to a JSON file (rank 0).
`--also` runs more GKD stages in the same process group afterwards, each optionally
stopped after a step and resumed (to check resume under data parallelism cheaply).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 128


def child_of(parent_cfg):
    """A child holding every variant kind: full, fewer KV heads, linear and no-op attention;
    full, narrower, linear and no-op FFN."""
    from megatron_puzzle.arch import AttentionVariant as A, BlockConfig, FFNVariant as F

    blocks = list(parent_cfg.blocks)
    blocks[1] = BlockConfig(A("full", 1), F("full", 48))
    blocks[2] = BlockConfig(A("linear"), F("no_op"))
    blocks[3] = BlockConfig(A("no_op"), F("linear"))
    return parent_cfg.with_blocks(blocks)


def make_run(run_dir, seed: int = 0, train_tokens: int = 8192, heldout_tokens: int = 2048):
    """RUN/parent, RUN/child (parent weights where shapes allow) and RUN/data; call after init_distributed(1)."""
    from _models import tiny_parent
    from megatron_puzzle.arch.shapes import random_canonical
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.model import checkpoint
    from megatron_puzzle.model.gpt import build_model
    from megatron_puzzle.utils.io import atomic_write_json

    run = Path(run_dir)
    pcfg = tiny_parent(num_layers=4, vocab_size=VOCAB)
    ccfg = child_of(pcfg)
    pw = random_canonical(pcfg, seed=seed, std=0.15)
    cw = random_canonical(ccfg, seed=seed + 1, std=0.15)
    cw = {k: (pw[k].clone() if k in pw and pw[k].shape == v.shape else v) for k, v in cw.items()}
    for cfg, w, name in ((pcfg, pw, "parent"), (ccfg, cw, "child")):
        model = build_model(cfg)
        load_canonical(model, w)
        checkpoint.save(model, run / name)
    data = run / "data"
    data.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", train_tokens), ("calib", 512), ("heldout", heldout_tokens)):
        np.save(data / f"{split}.npy", g.integers(0, VOCAB, n, dtype=np.uint32))
        splits[split] = {"file": f"{split}.npy", "tokens": n}
    atomic_write_json(data / "meta.json", {"seed": seed, "vocab_size": VOCAB, "eos_id": 0, "splits": splits})
    (data / "done").write_text("ok\n")
    return run


def fixed_logits(seed: int = 5, shape=(2, 6, VOCAB)):
    """Teacher/student logits and targets, the same on every rank (the test rebuilds them in float64)."""
    g = torch.Generator().manual_seed(seed)
    t = 3.0 * torch.randn(shape, generator=g)
    s = 3.0 * torch.randn(shape, generator=g)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return t, s, targets


def sequence_hidden(seed: int = 1):
    """Student / teacher hidden states [seq, batch, hidden] per layer, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(6, 2, 16, generator=g) for _ in range(3)]
    ht = [h + 0.5 * torch.randn(6, 2, 16, generator=g) for h in hs]
    return hs, ht


def check_losses(out: dict) -> None:
    """Vocab-parallel KL / CE / argmax on this rank's shard; values and gathered gradients into `out`."""
    from megatron.core import parallel_state

    from megatron_puzzle.model import losses
    from megatron_puzzle.model.parallel import tp_rank, tp_size

    t, s, targets = fixed_logits()
    shard = VOCAB // tp_size()
    sl = slice(tp_rank() * shard, (tp_rank() + 1) * shard)
    results = {}
    for name, fn in (("kl", lambda x: losses.vocab_parallel_kl(t[..., sl], x, temperature=2.0)),
                     ("ce", lambda x: losses.vocab_parallel_cross_entropy(x, targets))):
        x = s[..., sl].clone().requires_grad_(True)
        value = fn(x)
        value.backward()
        parts = [torch.empty_like(x.grad) for _ in range(tp_size())]
        torch.distributed.all_gather(parts, x.grad.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        results[name] = {"value": float(value), "grad": torch.cat(parts, dim=-1).tolist()}
    results["argmax"] = losses.vocab_parallel_argmax(s[..., sl]).tolist()
    # the cosine term under sequence parallelism: each rank holds a slice of the sequence
    hs, ht = sequence_hidden()
    seq = hs[0].shape[0] // tp_size()
    rows = slice(tp_rank() * seq, (tp_rank() + 1) * seq)
    x = [h[rows].clone().requires_grad_(True) for h in hs]
    value = losses.cosine_term(x, [h[rows] for h in ht], sequence_parallel=True)
    value.backward()
    grads = []
    for h in x:
        parts = [torch.empty_like(h.grad) for _ in range(tp_size())]
        torch.distributed.all_gather(parts, h.grad.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        grads.append(torch.cat(parts, dim=0).tolist())
    results["cosine_sp"] = {"value": float(value), "grad": grads}
    out["losses"] = results


class _Stopped(Exception):
    pass


def _stop(step: int, at: int) -> None:
    if step == at:
        raise _Stopped(f"simulated kill after step {at}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--config", required=True, help="GKDConfig as JSON")
    ap.add_argument("--out", required=True)
    ap.add_argument("--also", default="[]",
                    help='JSON list of {"run_dir", "config", "stop_after" (optional step), '
                         '"resume_config" (optional: resume at another layout), "branches" (optional: '
                         '[{"run_dir", "config"}], copies of the stopped run resumed at other layouts)}')
    a = ap.parse_args()

    from megatron_puzzle.distill.gkd import GKDConfig, run_gkd
    from megatron_puzzle.model.parallel import init_distributed, shutdown

    init_distributed(a.tp, pipeline_parallel=a.pp)
    out = {}
    if a.pp == 1:
        check_losses(out)
    result = run_gkd(a.run_dir, GKDConfig.from_dict(json.loads(a.config)))
    out["eval"] = result
    for extra in json.loads(a.also):
        cfg = GKDConfig.from_dict(extra["config"])
        stop = extra.get("stop_after")
        if stop is not None:
            try:
                run_gkd(extra["run_dir"], cfg, on_step=lambda step, _: _stop(step, stop))
            except _Stopped:
                pass
            # the finished run removes its resume checkpoints: keep a copy of the stopped state to inspect
            torch.distributed.barrier()
            if torch.distributed.get_rank() == 0:
                shutil.copytree(Path(extra["run_dir"]) / "gkd" / "ckpt", Path(extra["run_dir"] + "_ckpt_at_stop"))
                for branch in extra.get("branches", []):  # the stopped run, copied to resume at other layouts
                    shutil.copytree(extra["run_dir"], branch["run_dir"])
            torch.distributed.barrier()
            for branch in extra.get("branches", []):
                run_gkd(branch["run_dir"], GKDConfig.from_dict(branch["config"]))
        if extra.get("resume_config"):
            cfg = GKDConfig.from_dict(extra["resume_config"])
        run_gkd(extra["run_dir"], cfg)
    if torch.distributed.get_rank() == 0:
        Path(a.out).write_text(json.dumps(out))
    shutdown()


if __name__ == "__main__":
    main()
