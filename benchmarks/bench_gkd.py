"""GKD benchmark: training throughput at TP 1 / TP 2 on CPU, and the loss ablation on the default parent.

1. Throughput: a child of a small Llama-shaped parent (4 query heads, so TP 2 can split
   it; SmolLM2-135M has 9 heads, which 2 does not divide), random weights and tokens,
   `run_gkd` under torchrun with 1 and 2 processes; tokens/s is the median over the
   steps after the first two.
2. Ablation: a child of SmolLM2-135M-Instruct (the default parent) with a few subblocks
   removed or shrunk from the parent's own weights, uptrained with equal token budgets
   by cosine+KL, KL alone and LM loss alone; held-out KL to the parent, LM loss, top-1
   agreement and next-token accuracy before and after.

    python benchmarks/bench_gkd.py [--work DIR] [--skip-throughput] [--skip-ablation] [--steps N]
    python benchmarks/bench_gkd.py --before-tree DIR --rounds 3   # engine vs. an older source tree

3. `--before-tree DIR` (a source tree of an earlier commit, e.g. `git archive <commit> | tar -x -C DIR`):
   the same single-process throughput run with that tree's `megatron_puzzle` and with this one,
   interleaved round by round (A B A B ...) so a machine shared with other work slows both alike;
   prints the median tokens/s of each round and their ratio.

Writes DIR/results.json and prints markdown tables (copied into docs/gkd.md).
On a GPU run the throughput part with `--dtype bfloat16` and `--fp8 hybrid` instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- shared

def _save_data(data: Path, vocab: int, train: int, heldout: int, seed: int = 0) -> None:
    from megatron_puzzle.utils.io import atomic_write_json

    data.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", train), ("calib", 1024), ("heldout", heldout)):
        np.save(data / f"{split}.npy", g.integers(0, vocab, n, dtype=np.uint32))
        splits[split] = {"file": f"{split}.npy", "tokens": n}
    atomic_write_json(data / "meta.json", {"seed": seed, "vocab_size": vocab, "splits": splits})
    (data / "done").write_text("ok\n")


def _log(run: Path) -> list[dict[str, float]]:
    with open(run / "gkd" / "log.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


# --------------------------------------------------------------------------- 1. throughput

def small_parent():
    from megatron_puzzle.arch import ModelConfig

    return ModelConfig(vocab_size=8192, hidden_size=256, num_layers=6, num_attention_heads=4, num_kv_heads=2,
                       intermediate_size=768, max_position_embeddings=512)


def small_child(parent):
    from megatron_puzzle.arch import AttentionVariant as A, BlockConfig, FFNVariant as F

    blocks = list(parent.blocks)
    blocks[1] = BlockConfig(A("full", 1), F("full", 384))
    blocks[3] = BlockConfig(A("no_op"), F("full", 768))
    blocks[4] = BlockConfig(A("full", 2), F("linear"))
    return parent.with_blocks(blocks)


def make_small_run(run: Path) -> None:
    from megatron_puzzle.arch.shapes import random_canonical
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.model import checkpoint
    from megatron_puzzle.model.gpt import build_model
    from megatron_puzzle.model.parallel import init_distributed

    init_distributed(1)
    parent = small_parent()
    for cfg, name in ((parent, "parent"), (small_child(parent), "child")):
        model = build_model(cfg)
        load_canonical(model, random_canonical(cfg, seed=0, std=0.05))
        checkpoint.save(model, run / name)
    _save_data(run / "data", parent.vocab_size, train=1 << 16, heldout=4096)


def throughput_worker(args) -> None:
    """Runs under torchrun: a short GKD run at --tp; rank 0's log.csv has tokens/s per step."""
    from megatron_puzzle.distill.gkd import GKDConfig, run_gkd

    cfg = GKDConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, warmup=1, save_interval=0,
                    eval_tokens=0, tp=args.tp, dtype=args.dtype, fp8=args.fp8, progress=False)
    run_gkd(args.run_dir, cfg, overwrite=True)


def throughput(work: Path, args) -> list[dict]:
    base = work / "small"
    if not (base / "data" / "done").exists():
        shutil.rmtree(base, ignore_errors=True)
        make_small_run(base)
    rows = []
    # the same two cores: one process with 2 threads or 1 thread, or two with 1 thread each
    for tp, threads in ((1, 2), (1, 1), (2, 1)):
        run = work / f"small_tp{tp}"
        run.mkdir(parents=True, exist_ok=True)
        for name in ("parent", "child", "data"):
            if not (run / name).exists():
                (run / name).symlink_to(base / name)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp}", "--master-port", str(29600 + tp),
               __file__, "--throughput-worker", "--tp", str(tp), "--run-dir", str(run), "--tp-steps", str(args.tp_steps),
               "--tp-batch", str(args.tp_batch), "--tp-seq", str(args.tp_seq), "--dtype", args.dtype]
        if args.fp8:
            cmd += ["--fp8", args.fp8]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode:
            raise SystemExit(f"TP {tp} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        log = _log(run)
        tok_s = statistics.median(r["tokens_per_s"] for r in log[2:])
        rows.append({"tp": tp, "processes": tp, "threads_per_process": threads, "tokens_per_s": round(tok_s, 1),
                     "steps": len(log), "tokens_per_step": args.tp_batch * args.tp_seq,
                     "wall_s": round(time.perf_counter() - t0, 1), "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"]})
        print(f"TP {tp} ({threads} thread(s) per process): {tok_s:.0f} tokens/s", flush=True)
    return rows


def engine_vs_tree(work: Path, args) -> dict:
    """tokens/s of this tree's GKD against `--before-tree`'s, same settings, interleaved rounds."""
    base = work / "small"
    if not (base / "data" / "done").exists():
        shutil.rmtree(base, ignore_errors=True)
        make_small_run(base)
    trees = {"before": Path(args.before_tree).resolve(), "after": REPO}
    out: dict = {name: [] for name in trees}
    for rnd in range(args.rounds):
        for name, tree in trees.items():
            run = work / f"cmp_{name}"
            run.mkdir(parents=True, exist_ok=True)
            for d in ("parent", "child", "data"):
                if not (run / d).exists():
                    (run / d).symlink_to(base / d)
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore", PYTHONPATH=str(tree))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--master-port",
                   str(29700 + rnd), __file__, "--throughput-worker", "--tp", "1", "--run-dir", str(run),
                   "--tp-steps", str(args.tp_steps), "--tp-batch", str(args.tp_batch), "--tp-seq", str(args.tp_seq),
                   "--dtype", args.dtype]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
            if proc.returncode:
                raise SystemExit(f"{name} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            log = _log(run)
            tok_s = statistics.median(r["tokens_per_s"] for r in log[2:])
            out[name].append({"tokens_per_s": round(tok_s, 1), "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"]})
            print(f"round {rnd + 1} {name}: {tok_s:.0f} tokens/s (loss {log[0]['loss']:.5f} -> {log[-1]['loss']:.5f})",
                  flush=True)
    med = {name: statistics.median(r["tokens_per_s"] for r in rows) for name, rows in out.items()}
    out["median_tokens_per_s"] = med
    out["after_over_before"] = round(med["after"] / med["before"], 3)
    out["settings"] = {"tokens_per_step": args.tp_batch * args.tp_seq, "steps": args.tp_steps,
                       "processes": 1, "threads": args.threads, "model": "small_parent/small_child"}
    return out


# --------------------------------------------------------------------------- 2. ablation on the default parent

ATTN_NO_OP = (6, 13, 19, 25)
ATTN_KV1 = (10, 22)
FFN_HALF = (3, 8, 15, 21, 27)


def default_child(cfg, tensors):
    """Blocks and canonical weights of a child of the default parent, all taken from the parent's weights:
    no-op attention on 4 layers, 1 KV head (mean of the parent's) on 2, half-width FFN (first channels) on 5."""
    from megatron_puzzle.arch import AttentionVariant as A, BlockConfig, FFNVariant as F
    from megatron_puzzle.arch.shapes import canonical_shapes

    half = cfg.intermediate_size // 2
    blocks = list(cfg.blocks)
    out = dict(tensors)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        attn, ffn = blocks[i].attention, blocks[i].ffn
        if i in ATTN_NO_OP:
            attn = A("no_op")
            for k in ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                      "self_attn.v_proj.weight", "self_attn.o_proj.weight"):
                out.pop(p + k)
        elif i in ATTN_KV1:
            attn = A("full", 1)
            for k in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
                w = tensors[p + k]
                out[p + k] = w.view(cfg.num_kv_heads, cfg.head_dim, -1).mean(0)
        if i in FFN_HALF:
            ffn = F("full", half)
            out[p + "mlp.gate_proj.weight"] = tensors[p + "mlp.gate_proj.weight"][:half].clone()
            out[p + "mlp.up_proj.weight"] = tensors[p + "mlp.up_proj.weight"][:half].clone()
            out[p + "mlp.down_proj.weight"] = tensors[p + "mlp.down_proj.weight"][:, :half].clone()
        blocks[i] = BlockConfig(attn, ffn)
    child = cfg.with_blocks(blocks)
    shapes = canonical_shapes(child)
    assert set(shapes) == set(out) and all(tuple(out[k].shape) == s for k, s in shapes.items())
    return child, out


def make_default_run(run: Path, train_tokens: int, heldout_tokens: int) -> None:
    from megatron_puzzle.convert.hf_io import default_parent_path, load_tokenizer, read_hf_checkpoint
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.data import build_token_shards
    from megatron_puzzle.model import checkpoint
    from megatron_puzzle.model.gpt import build_model
    from megatron_puzzle.model.parallel import init_distributed

    init_distributed(1)
    path = default_parent_path()
    cfg, tensors = read_hf_checkpoint(path)
    child_cfg, child_tensors = default_child(cfg, tensors)
    for c, w, name in ((cfg, tensors, "parent"), (child_cfg, child_tensors, "child")):
        if not (run / name / "done").exists():
            model = build_model(c)
            load_canonical(model, w)
            checkpoint.save(model, run / name)
            del model
    build_token_shards(run / "data", load_tokenizer(path), source="web", train_tokens=train_tokens,
                       calib_tokens=1024, heldout_tokens=heldout_tokens, seed=0)


ABLATIONS = {"cosine+kl": {"cosine": 1.0, "kl": 1.0, "lm": 0.0},
             "kl": {"cosine": 0.0, "kl": 1.0, "lm": 0.0},
             "lm": {"cosine": 0.0, "kl": 0.0, "lm": 1.0}}


def ablation(work: Path, args) -> dict:
    from megatron_puzzle.distill.gkd import GKDConfig, run_gkd
    from megatron_puzzle.model.parallel import init_distributed

    torch.set_num_threads(2)
    base = work / "default"
    tokens = args.steps * args.batch_size * args.seq_len
    make_default_run(base, train_tokens=max(tokens + args.seq_len + 1, 131072), heldout_tokens=16384)
    init_distributed(1)
    out = {"child": {"attn_no_op": ATTN_NO_OP, "attn_kv1": ATTN_KV1, "ffn_half": FFN_HALF},
           "tokens": tokens, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
           "lr": args.lr, "runs": {}}
    for name, weights in ABLATIONS.items():
        run = work / f"default_{name.replace('+', '_')}"
        run.mkdir(parents=True, exist_ok=True)
        for part in ("parent", "child", "data"):
            if not (run / part).exists():
                (run / part).symlink_to(base / part)
        cfg = GKDConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                        min_lr=args.lr / 10, warmup=max(1, args.steps // 10), save_interval=0,
                        eval_tokens=args.eval_tokens, loss=weights, progress=False)
        t0 = time.perf_counter()
        result = run_gkd(run, cfg, overwrite=True)
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        log = _log(run)
        result["tokens_per_s"] = round(statistics.median(r["tokens_per_s"] for r in log[1:]), 1)
        out["runs"][name] = result
        b, a = result["before"], result["after"]
        print(f"{name}: KL {b['kl_div']:.4f} -> {a['kl_div']:.4f}, LM {b['lm_loss']:.3f} -> {a['lm_loss']:.3f}, "
              f"top-1 {b['top1_agreement']:.3f} -> {a['top1_agreement']:.3f} ({result['wall_s']} s)", flush=True)
    return out


def tables(results: dict) -> str:
    lines = []
    if "throughput" in results:
        lines += ["| TP | processes x threads | tokens/s |", "|---|---|---|"]
        for r in results["throughput"]:
            lines.append(f"| {r['tp']} | {r['processes']} x {r['threads_per_process']} | {r['tokens_per_s']:.0f} |")
        lines.append("")
    if "ablation" in results:
        ab = results["ablation"]
        before = next(iter(ab["runs"].values()))["before"]
        lines += ["| loss | KL to parent | LM loss | top-1 agreement | next-token accuracy | tokens/s |",
                  "|---|---|---|---|---|---|",
                  f"| (child before GKD) | {before['kl_div']:.4f} | {before['lm_loss']:.3f} | "
                  f"{before['top1_agreement']:.3f} | {before['next_token_accuracy']:.3f} | |"]
        for name, r in ab["runs"].items():
            a = r["after"]
            lines.append(f"| {name} | {a['kl_div']:.4f} | {a['lm_loss']:.3f} | {a['top1_agreement']:.3f} | "
                         f"{a['next_token_accuracy']:.3f} | {r['tokens_per_s']:.0f} |")
        lines.append(f"| (parent) | 0 | {before['parent_lm_loss']:.3f} | 1 | {before['parent_next_token_accuracy']:.3f} | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/bench_gkd", help="scratch directory for run dirs")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-ablation", action="store_true")
    ap.add_argument("--steps", type=int, default=12, help="ablation steps (equal for every loss)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--tp-steps", type=int, default=8)
    ap.add_argument("--tp-batch", type=int, default=4)
    ap.add_argument("--tp-seq", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--fp8", default=None)
    ap.add_argument("--before-tree", help="compare GKD throughput with this source tree (interleaved rounds)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads of the compared runs")
    # internal: one throughput run under torchrun
    ap.add_argument("--throughput-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.throughput_worker:
        args.steps, args.batch_size, args.seq_len = args.tp_steps, args.tp_batch, args.tp_seq
        throughput_worker(args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads()}
    if args.before_tree:
        results["engine_vs_before"] = engine_vs_tree(work, args)
        (work / "compare.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results["engine_vs_before"], indent=2))
        return
    if not args.skip_throughput:
        results["throughput"] = throughput(work, args)
    if not args.skip_ablation:
        results["ablation"] = ablation(work, args)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(tables(results))


if __name__ == "__main__":
    main()
