"""Is an architecture's quality the sum of its variants' replace-1-block scores?

The search ranks architectures by the sum of their variants' 1-block KL. This
benchmark measures how well that ranking holds on the default parent
(SmolLM2-135M-Instruct): it scores every (layer, variant) of a modest space on
real held-out text, then builds random multi-replacement children, measures each
whole child's KL to the parent on the same tokens, and reports the Spearman rank
correlation between summed and measured KL (and the same for LM loss).

Variants get training-free weights from `megatron_puzzle.init` (mean-pooled KV
heads, channel-contribution FFN pruning, least-squares linear FFN), with
calibration statistics from an earlier part of the text than the held-out part.

    python benchmarks/bench_additivity.py [--archs 20] [--heldout-batches 1] [--batch-size 4] [--seq-len 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch


def text_tokens(tokenizer, n_tokens: int) -> torch.Tensor:
    from megatron_puzzle.data import default_sample_path

    docs = [d for d in default_sample_path().read_text().split("\n\n") if d.strip()]
    ids: list[int] = []
    for d in docs:
        ids += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        sys.exit(f"the shipped sample has only {len(ids)} tokens; ask for fewer")
    return torch.tensor(ids[:n_tokens])


def windows(ids: torch.Tensor, batches: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """Consecutive windows [batch, seq + 1] (inputs and next-token targets)."""
    out, pos = [], 0
    for _ in range(batches):
        rows = []
        for _ in range(batch_size):
            rows.append(ids[pos : pos + seq_len + 1])
            pos += seq_len
        out.append(torch.stack(rows))
    return out


def random_architectures(cfg, space, n: int, rng: random.Random):
    """`n` children, each replacing k random subblocks (k spread from 2 to a quarter of all subblocks)."""
    from megatron_puzzle.score import entry_block

    slots = [(layer, kind) for layer in range(cfg.num_layers) for kind in ("attn", "ffn")]
    parent_names = {(i, "attn"): b.attention.name for i, b in enumerate(cfg.blocks)}
    parent_names.update({(i, "ffn"): b.ffn.name for i, b in enumerate(cfg.blocks)})
    archs = []
    for j in range(n):
        k = 2 + round(j * (len(slots) // 4 - 2) / max(1, n - 1))
        chosen = []
        for layer, kind in rng.sample(slots, k):
            options = [v for v in space[layer] if v.startswith(kind + "_") and v != parent_names[(layer, kind)]]
            chosen.append((layer, rng.choice(options)))
        blocks = list(cfg.blocks)
        for layer, name in chosen:
            blocks[layer] = entry_block(cfg.with_blocks(blocks), layer, name)
        archs.append((sorted(chosen), cfg.with_blocks(blocks)))
    return archs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", type=int, default=20, help="random multi-replacement architectures (>= 20)")
    ap.add_argument("--heldout-batches", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calib-batches", type=int, default=1)
    ap.add_argument("--variants", default="attn_kv1,attn_no_op,ffn_768",
                    help="variant names scored at every layer (besides the parent's own)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from scipy.stats import pearsonr, spearmanr

    from megatron_puzzle.convert.hf_io import default_parent_path, load_tokenizer, read_hf_checkpoint
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.init.calibration import collect_calibration
    from megatron_puzzle.init.variants import InitConfig, init_variant
    from megatron_puzzle.model.gpt import build_model
    from megatron_puzzle.model.parallel import init_distributed
    from megatron_puzzle.score import ReplaceScorer, assemble, parent_references, score_architecture

    init_distributed(1)
    path = default_parent_path()
    cfg, tensors = read_hf_checkpoint(path)
    parent = build_model(cfg)
    load_canonical(parent, tensors)
    parent.eval()
    tokenizer = load_tokenizer(path)

    n_calib = args.calib_batches * args.batch_size * args.seq_len
    n_held = args.heldout_batches * args.batch_size * (args.seq_len + 1)
    ids = text_tokens(tokenizer, n_calib + n_held + 1)
    calib = [w[:, :-1] for w in windows(ids[:n_calib + 1], args.calib_batches, args.batch_size, args.seq_len)]
    heldout = windows(ids[n_calib:], args.heldout_batches, args.batch_size, args.seq_len)  # later text than calib

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    space = [list(names) for _ in range(cfg.num_layers)]
    init = InitConfig(ffn_linear="up_down")  # no least-squares statistics needed unless ffn_linear is scored
    t = time.perf_counter()
    stats = collect_calibration(parent, tensors, calib, need_lstsq=False, progress=False)
    cache: dict = {}

    def variant_weights(layer, name):
        if (layer, name) not in cache:
            cache[(layer, name)] = init_variant(cfg, tensors, layer, name, init, stats)[0]
        return cache[(layer, name)]

    items = [(layer, n) for layer in range(cfg.num_layers) for n in names]
    print(f"parent {path.name}: {cfg.num_layers} layers; {len(items)} (layer, variant) items; "
          f"held-out {args.heldout_batches} x {args.batch_size} x {args.seq_len} tokens", flush=True)
    scorer = ReplaceScorer(parent, variant_weights, max_entries=len(items))
    one_block, parent_m = scorer.score(items, heldout, progress=False)
    t_score = time.perf_counter() - t
    print(f"scored {len(items)} items in {t_score:.0f} s ({t_score / len(items):.2f} s each); "
          f"parent lm_loss {parent_m['lm_loss']:.4f}", flush=True)

    rng = random.Random(args.seed)
    rows = []
    t = time.perf_counter()
    refs = parent_references(parent, heldout)
    for chosen, child_cfg in random_architectures(cfg, space, args.archs, rng):
        # a whole child model, built and run from scratch: nothing shared with the 1-block scorer
        measured = score_architecture(parent, child_cfg, assemble(cfg, tensors, child_cfg, variant_weights),
                                      heldout, refs)
        rows.append({
            "replaced": [f"{layer}:{name}" for layer, name in chosen],
            "sum_kl": sum(one_block[c]["kl_div"] for c in chosen),
            "kl": measured["kl_div"],
            "sum_dloss": sum(one_block[c]["lm_loss"] - parent_m["lm_loss"] for c in chosen),
            "dloss": measured["lm_loss"] - parent_m["lm_loss"],
            "top1": measured["top1_agreement"],
        })
    t_arch = time.perf_counter() - t

    rho_kl, p_kl = spearmanr([r["sum_kl"] for r in rows], [r["kl"] for r in rows])
    rho_loss, _ = spearmanr([r["sum_dloss"] for r in rows], [r["dloss"] for r in rows])
    r_kl, _ = pearsonr([r["sum_kl"] for r in rows], [r["kl"] for r in rows])
    print(f"\n{'#':>3} {'subblocks':>9} {'sum 1-block KL':>14} {'measured KL':>11} {'ratio':>6} "
          f"{'sum dloss':>9} {'dloss':>7} {'top1':>6}")
    for i, r in enumerate(rows):
        print(f"{i:3d} {len(r['replaced']):9d} {r['sum_kl']:14.4f} {r['kl']:11.4f} {r['kl'] / r['sum_kl']:6.2f} "
              f"{r['sum_dloss']:9.4f} {r['dloss']:7.4f} {r['top1']:6.3f}")
    print(f"\nSpearman(sum 1-block KL, measured KL) = {rho_kl:.3f} (p = {p_kl:.1e}); Pearson = {r_kl:.3f}")
    print(f"Spearman(sum 1-block LM-loss increase, measured increase) = {rho_loss:.3f}")
    total = time.perf_counter() - t_start
    print(f"wall: scoring {t_score:.0f} s, {len(rows)} architectures {t_arch:.0f} s, total {total:.0f} s")

    if args.out:
        from megatron_puzzle.utils.io import atomic_write_json

        top = sorted(((v["kl_div"], f"{k[0]}:{k[1]}") for k, v in one_block.items()), reverse=True)
        atomic_write_json(args.out, {
            "parent": path.name, "heldout_tokens": sum(w[:, 1:].numel() for w in heldout), "variants": names,
            "parent_metrics": parent_m, "spearman_kl": rho_kl, "spearman_kl_p": p_kl, "pearson_kl": r_kl,
            "spearman_lm_loss": rho_loss, "architectures": rows, "worst_one_block": top[:10],
            "one_block": {f"{k[0]}:{k[1]}": v for k, v in one_block.items()},
            "wall_s": {"score": t_score, "architectures": t_arch, "total": total},
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
