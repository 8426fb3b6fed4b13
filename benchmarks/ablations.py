"""The Puzzle paper's ablations, in miniature, on a cut of the default parent with real text.

One small run (SmolLM2-135M-Instruct cut to --layers layers, World English Bible text)
goes through import -> data -> init -> bld -> score -> measure -> search with the
pipeline's stages; then, on that run:

1. BLD vs init-only library: the searched architecture assembled from RUN/library
   (BLD-trained blocks) and from RUN/init (training-free init). Paper: BLD is better.
2. KL vs LM-loss scoring: the MIP solved with the replace-1-block KL objective and with
   the LM-loss objective, both children from the library. Paper: KL scoring is better.
3. MIP vs greedy vs random at equal cost (the same throughput constraint).
   Paper: the MIP is best.
4. GKD loss choices: the MIP child uptrained for --gkd-steps with cosine+KL, KL only,
   LM only and cosine+KL+LM. Paper: cosine + KL is best; adding the LM loss does not help.

Quality is KL(parent || child) and next-token accuracy on held-out tokens. Each
ablation prints the paper's direction and whether it held here; all results go to
OUT/ablations.json. Usage:

    python benchmarks/ablations.py --out /tmp/ablations [--layers 6] [--quick]
    python benchmarks/ablations.py --run-dir runs/default --out /tmp/ablations   # reuse a finished run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import setup_process  # a sibling of this script


def base_config(layers: int, quick: bool) -> dict:
    from megatron_puzzle.pipeline.config import resolve

    user = {
        "parent_layers": layers,
        "data": {"source": "web", "train_tokens": 32768 if quick else 98304, "calib_tokens": 4096,
                 "heldout_tokens": 8192},
        "search_space": {"ffn_fractions": [1.0, 0.5, 0.25], "round_to": 64},
        "bld": {"steps": 4 if quick else 16, "batch_size": 2, "seq_len": 128, "checkpoint_every": 8,
                "eval_batches": 1},
        "score": {"tokens": 2048 if quick else 4096, "batch_size": 4, "seq_len": 128},
        "scenario": {"name": "cpu-ablation", "batch_size": 4, "prefill_len": 64, "decode_len": 64},
        "measure": {"warmup": 1, "repeats": 3},
        "search": {"constraints": ["throughput>=1.5x"], "pareto": None},
    }
    return resolve(user, quick=True)


def heldout(run: Path, tokens: int):
    from megatron_puzzle.score.stage import heldout_batches

    return heldout_batches(run / "data", tokens, 128, 4)


def evaluate(parent, cfg, tensors, batches) -> dict:
    from megatron_puzzle.score.evaluate import score_architecture

    m = score_architecture(parent, cfg, tensors, batches)
    return {"kl_to_parent": m["kl_div"], "next_token_accuracy": m["accuracy"], "lm_loss": m["lm_loss"]}


def blocks_of(variants):
    from megatron_puzzle.arch import BlockConfig, variant_from_name

    return [BlockConfig(variant_from_name(a), variant_from_name(f)) for a, f in variants]


def verdict(name: str, paper: str, held: bool, detail: dict) -> dict:
    print(f"\n[{name}] paper: {paper}\n  here: {json.dumps(detail, indent=None)}\n  held: {'yes' if held else 'NO'}")
    return {"paper": paper, "held": bool(held), "results": detail}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/puzzle-ablations", help="work directory (resumable)")
    ap.add_argument("--layers", type=int, default=6, help="first N layers of the parent")
    ap.add_argument("--gkd-steps", type=int, default=20)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smaller budgets (a smoke run)")
    ap.add_argument("--run-dir", help="reuse this run (complete up to search, e.g. the default run of the whole "
                    "parent) instead of building a small one on a cut of the parent")
    ap.add_argument("--skip-gkd", action="store_true", help="leave out ablation 4 (GKD loss choices)")
    args = ap.parse_args()
    setup_process(logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    from megatron_puzzle.library import Library
    from megatron_puzzle.model import checkpoint
    from megatron_puzzle.model.parallel import init_distributed
    from megatron_puzzle.pipeline.run import run_pipeline
    from megatron_puzzle.search import greedy, load_problem, random_feasible, solve

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.run_dir:
        import yaml

        run = Path(args.run_dir)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        print(f"reusing {run}")
    else:
        run = out / "run"
        cfg = base_config(args.layers, args.quick)
        run_pipeline(run, cfg, until="search")
        print(f"base run ready in {time.perf_counter() - t0:.0f} s ({run})")

    init_distributed(1)
    parent = checkpoint.load(run / "parent")
    parent.eval()
    pcfg = parent.puzzle_config
    batches = heldout(run, args.eval_tokens)
    library, init_lib = Library(run / "library"), Library(run / "init")
    constraints = cfg["search"]["constraints"]
    problem = load_problem(run / "score" / "scores.json", run / "measure" / "costs.json", run / "library" / "space.json")
    results: dict = {"config": {"run": str(run), "layers": pcfg.num_layers, "constraints": constraints,
                                "quick": args.quick, "eval_tokens": args.eval_tokens, "gkd_steps": args.gkd_steps}}

    def child_metrics(variants, lib=library):
        c = pcfg.with_blocks(blocks_of(variants))
        return evaluate(parent, c, lib.assemble(c), batches)

    mip = solve(problem, constraints, "kl_div")[0]

    # 1. BLD vs init-only
    bld_m, init_m = child_metrics(mip.variants), child_metrics(mip.variants, init_lib)
    results["bld_vs_init"] = verdict("BLD vs init-only library", "BLD-trained blocks give a better child than "
                                     "training-free init", bld_m["kl_to_parent"] < init_m["kl_to_parent"],
                                     {"bld": bld_m, "init_only": init_m, "variants": mip.variants})

    # 2. KL vs LM-loss scoring
    lm_sol = solve(problem, constraints, "lm_loss")[0]
    lm_m = child_metrics(lm_sol.variants)
    results["kl_vs_lm_scoring"] = verdict(
        "KL vs LM-loss scoring", "scoring blocks by KL divergence picks a better child than by LM loss",
        bld_m["kl_to_parent"] <= lm_m["kl_to_parent"] and bld_m["next_token_accuracy"] >= lm_m["next_token_accuracy"],
        {"kl_scored": bld_m, "lm_scored": lm_m, "same_architecture": lm_sol.variants == mip.variants})

    # 3. MIP vs greedy vs random at equal cost
    g = greedy(problem, constraints, "kl_div")
    r = random_feasible(problem, constraints, "kl_div", seed=0)
    g_m, r_m = child_metrics(g.variants), child_metrics(r.variants)
    detail = {name: {**m, "predicted_throughput": s.totals.get("throughput"), "objective": s.objective}
              for name, m, s in (("mip", bld_m, mip), ("greedy", g_m, g), ("random", r_m, r))}
    results["mip_vs_greedy_vs_random"] = verdict(
        "MIP vs greedy vs random (same throughput constraint)", "the MIP child is the best of the three",
        bld_m["kl_to_parent"] <= min(g_m["kl_to_parent"], r_m["kl_to_parent"]), detail)

    if args.skip_gkd:
        (out / "ablations.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nablations 1-3 in {time.perf_counter() - t0:.0f} s; results in {out / 'ablations.json'}")
        return

    # 4. GKD loss choices on the MIP child
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.distill.gkd import GKDConfig, run_gkd
    from megatron_puzzle.model.gpt import build_model

    child_cfg = pcfg.with_blocks(blocks_of(mip.variants))
    gkd_base = dict(cfg["gkd"], steps=args.gkd_steps, save_interval=0, eval_tokens=args.eval_tokens,
                    seq_len=128, batch_size=2, progress=False)
    losses = {"cosine+kl": {"cosine": 1.0, "kl": 1.0, "lm": 0.0}, "kl": {"cosine": 0.0, "kl": 1.0, "lm": 0.0},
              "lm": {"cosine": 0.0, "kl": 0.0, "lm": 1.0}, "cosine+kl+lm": {"cosine": 1.0, "kl": 1.0, "lm": 1.0}}
    gkd_results = {}
    for name, weights in losses.items():
        d = out / f"gkd_{name.replace('+', '_')}"
        d.mkdir(parents=True, exist_ok=True)
        for link in ("parent", "data"):
            if not (d / link).exists():
                os.symlink((run / link).resolve(), d / link)
        if not (d / "child" / "done").exists():
            model = build_model(child_cfg)
            load_canonical(model, library.assemble(child_cfg))
            checkpoint.save(model, d / "child")
        e = run_gkd(d, GKDConfig.from_dict(dict(gkd_base, loss=weights)))
        gkd_results[name] = {"before_kl": e["before"]["kl_div"], "after_kl": e["after"]["kl_div"],
                             "after_accuracy": e["after"]["next_token_accuracy"]}
    best = min(gkd_results, key=lambda k: gkd_results[k]["after_kl"])
    results["gkd_losses"] = verdict("GKD loss choices", "cosine + KL is the best GKD loss; adding LM loss does not help",
                                    best == "cosine+kl", {**gkd_results, "best": best})
    (out / "ablations.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nall ablations in {time.perf_counter() - t0:.0f} s; results in {out / 'ablations.json'}")


if __name__ == "__main__":
    main()
