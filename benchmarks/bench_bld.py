"""BLD on the default parent (SmolLM2-135M-Instruct, 30 layers): throughput and normalised-MSE table.

    python benchmarks/bench_bld.py                      # both parts (launches the 2-rank run itself)
    python benchmarks/bench_bld.py --part throughput --ranks 1
    python benchmarks/bench_bld.py --part table --layers 0,10,20,29

Throughput: BLD over all 30 layers and the paper-like space (parent KV and its
divisors, linear, no-op; FFN fractions 1.0/0.87/0.75/0.5/0.25/0.2/0.1, linear, no-op)
for a few steps, at 1 and 2 data-parallel ranks: tokens/s (parent tokens), variant-
tokens/s (summed over trained variants) and the parent-forward share of the time.
Table: mean normalised MSE per variant kind on held-out text, for random init, the
training-free inits (channel contribution vs truncation, least squares vs up/down) and
after a short BLD, on a subset of layers.
Text: the shipped World English Bible sample, tokenized with the parent's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from megatron_puzzle.model.parallel import free_port

REPO = Path(__file__).resolve().parents[1]


def _setup(args):
    from megatron_puzzle.convert.hf_io import default_parent_path, load_tokenizer, read_hf_checkpoint
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.data import default_sample_path
    from megatron_puzzle.model.gpt import build_model
    from megatron_puzzle.model.parallel import init_distributed

    init_distributed(1)
    cfg, tensors = read_hf_checkpoint(default_parent_path())
    model = build_model(cfg)
    load_canonical(model, tensors)
    model.eval()
    tok = load_tokenizer(default_parent_path())
    ids = tok(default_sample_path().read_text(), add_special_tokens=False)["input_ids"]
    window = args.seq_len * args.batch_size
    batches = [torch.tensor(ids[i * window:(i + 1) * window]).view(args.batch_size, args.seq_len)
               for i in range(len(ids) // window)]
    return model, tensors, batches


def _calibrated_init(model, tensors, batches, init, n_calib):
    from megatron_puzzle.init.calibration import collect_calibration
    from megatron_puzzle.init.variants import init_pair, init_variant

    need_c, need_l = init.needs()
    stats = collect_calibration(model, tensors, batches[:n_calib], need_channels=need_c, need_lstsq=need_l,
                                progress=False) if (need_c or need_l) else None
    cfg = model.puzzle_config

    def source(layer, name):
        fn = init_pair if "+" in name else init_variant
        return fn(cfg, tensors, layer, name, init, stats, 0)[0]
    return source


def throughput(args):
    import torch.distributed as dist

    from megatron_puzzle.arch.search_space import configured_search_space
    from megatron_puzzle.distill.bld import BLDConfig, run_bld
    from megatron_puzzle.init.variants import InitConfig

    torch.set_num_threads(1)
    model, tensors, batches = _setup(args)
    init = InitConfig()
    n_calib = 2
    source = _calibrated_init(model, tensors, batches, init, n_calib)
    space = configured_search_space(model.puzzle_config)
    bld = BLDConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-4,
                    checkpoint_every=10**6, eval_batches=1, progress=False)
    eval_tokens = [batches[-1]]
    root = Path(args.out) / f"library_r{dist.get_world_size()}"
    report = run_bld(model, tensors, root, space, bld, init, lambda s: batches[n_calib + s], eval_tokens, source)
    # the training loop alone: wall time of the steps, the slowest rank decides
    stats = torch.tensor([report.train_s, report.variant_s, report.variant_tokens], dtype=torch.float64)
    walls = [torch.zeros_like(stats) for _ in range(dist.get_world_size())]
    dist.all_gather(walls, stats)
    if dist.get_rank() == 0:
        wall = max(w[0].item() for w in walls)
        out = {"ranks": dist.get_world_size(), "layers": model.puzzle_config.num_layers,
               "entries": sum(len(n) for n in space), "steps": args.steps,
               "tokens_per_step": args.batch_size * args.seq_len, "wall_s": wall,
               "tokens_per_s": args.steps * args.batch_size * args.seq_len / wall,
               "variant_tokens_per_s": sum(w[2].item() for w in walls) / wall,
               "parent_forward_share": max(1 - w[1].item() / w[0].item() for w in walls)}
        print(json.dumps(out))


KINDS = (("attn_kv (fewer KV heads)", lambda n, cfg: n.startswith("attn_kv") and n != f"attn_kv{cfg.num_kv_heads}"),
         ("attn_linear", lambda n, cfg: n == "attn_linear"),
         ("ffn pruned (all fractions < 1)", lambda n, cfg: n[4:].isdigit() and int(n[4:]) < cfg.intermediate_size),
         ("ffn_linear", lambda n, cfg: n == "ffn_linear"),
         ("attn_no_op", lambda n, cfg: n == "attn_no_op"), ("ffn_no_op", lambda n, cfg: n == "ffn_no_op"))


def table(args):
    from megatron_puzzle.arch.search_space import SearchSpaceConfig, configured_search_space
    from megatron_puzzle.distill.bld import BLDConfig, run_bld
    from megatron_puzzle.init.variants import InitConfig
    from megatron_puzzle.library import Library

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model, tensors, batches = _setup(args)
    cfg = model.puzzle_config
    layers = [int(x) for x in args.layers.split(",")]
    space = configured_search_space(cfg, SearchSpaceConfig(layers=layers))
    eval_tokens = batches[-args.eval_batches:]
    n_calib = args.calib_batches
    runs = {
        "random init": (InitConfig().random_everywhere(), 0),
        "truncation / up-down init": (InitConfig(ffn_prune="truncate", ffn_linear="up_down"), 0),
        "training-free init": (InitConfig(), 0),
        f"after BLD ({args.table_steps} steps)": (InitConfig(), args.table_steps),
    }
    results = {}
    tmp = Path(args.out)
    for label, (init, steps) in runs.items():
        t0 = time.perf_counter()
        bld = BLDConfig(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                        checkpoint_every=10**6, eval_batches=len(eval_tokens), progress=False)
        source = _calibrated_init(model, tensors, batches, init, n_calib)
        root = tmp / label.split()[0].replace("/", "") / str(steps)
        run_bld(model, tensors, root, space, bld, init, lambda s: batches[n_calib + s], eval_tokens, source)
        lib = Library(root)
        per_kind = defaultdict(list)
        for i, name in lib.entries():
            for kind, match in KINDS:
                if match(name, cfg):
                    per_kind[kind].append(lib.stats(i, name)["final_loss"])
        results[label] = {k: sum(v) / len(v) for k, v in per_kind.items()}
        print(f"{label}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    cols = list(runs)
    print(f"\nMean normalised MSE per variant kind (layers {layers}, {len(eval_tokens)} held-out batches of "
          f"{args.batch_size}x{args.seq_len} tokens):\n")
    print("| variant kind | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for kind, _ in KINDS:
        print(f"| {kind} | " + " | ".join(f"{results[c].get(kind, float('nan')):.4f}" for c in cols) + " |")
    # channel contribution vs truncation, per FFN size
    print("\nPer variant before training, mean over the layers:\n")
    print("| variant | training-free (mean-pool / vo / channel contribution / lstsq) | truncation / up-down | random |")
    print("|---|---:|---:|---:|")
    libs = {k: Library(tmp / k.split()[0].replace("/", "") / "0") for k in ("training-free init", "truncation / up-down init",
                                                                            "random init")}
    names = [n for n in space[layers[0]] if n[4:].isdigit() or n.startswith("attn_kv") or "linear" in n]
    for name in names:
        vals = [sum(lib.stats(i, name)["final_loss"] for i in layers) / len(layers) for lib in libs.values()]
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "throughput", "table"], default="all")
    ap.add_argument("--ranks", type=int, default=None, help="(internal) the throughput run under torchrun")
    ap.add_argument("--steps", type=int, default=3, help="BLD steps of the throughput run")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--layers", default="0,15,29", help="layers of the MSE table")
    ap.add_argument("--table-steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--out", default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args()
    if args.ranks is not None:
        return throughput(args)
    out = args.out or tempfile.mkdtemp(prefix="bench_bld_")
    if args.part in ("all", "throughput"):
        for ranks in (1, 2):
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", f"--master-port={free_port()}",
                   __file__, "--ranks", str(ranks), "--steps", str(args.steps), "--seq-len", str(args.seq_len),
                   "--batch-size", str(args.batch_size), "--out", out]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                sys.exit(f"throughput run at {ranks} ranks failed:\n{proc.stderr[-3000:]}")
            r = json.loads(lines[-1])
            print(f"{r['ranks']} rank(s): {r['layers']} layers, {r['entries']} entries, {r['steps']} steps of "
                  f"{r['tokens_per_step']} tokens: {r['tokens_per_s']:.1f} tokens/s, "
                  f"{r['variant_tokens_per_s']:.0f} variant-tokens/s, parent forward "
                  f"{100 * r['parent_forward_share']:.1f}% of the time ({r['wall_s']:.0f} s)", flush=True)
    if args.part in ("all", "table"):
        args.out = out
        table(args)


if __name__ == "__main__":
    main()
