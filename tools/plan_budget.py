#!/usr/bin/env python
"""Paper plan for a Puzzle run: variants, memory per rank per stage, tokens, FLOPs and GPU-hour estimates.

Estimates, not measurements: FLOPs from parameter counts (training 6 x params x tokens, forward
2 x params x tokens; attention score FLOPs left out), GPU-hours at an assumed fraction (MFU) of the
card's dense bf16 peak from megatron_puzzle.cost.gpus. Memory counts weights and optimizer state only
(activations come on top and depend on micro-batch and sequence length).

    python tools/plan_budget.py --model llama-3.1-70b --nodes 8 --gpus-per-node 8 --tp 8
"""

from __future__ import annotations

import argparse

from megatron_puzzle.arch import ModelConfig
from megatron_puzzle.arch.search_space import default_search_space
from megatron_puzzle.cost.gpus import get_gpu
from megatron_puzzle.cost.memory import non_block_params, subblock_params

MODELS = {  # published config.json values
    "llama-3.1-8b": ModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_attention_heads=32,
                                num_kv_heads=8, intermediate_size=14336, rope_theta=500000.0, rms_norm_eps=1e-5,
                                max_position_embeddings=131072, tie_word_embeddings=False),
    "llama-3.1-70b": ModelConfig(vocab_size=128256, hidden_size=8192, num_layers=80, num_attention_heads=64,
                                 num_kv_heads=8, intermediate_size=28672, rope_theta=500000.0, rms_norm_eps=1e-5,
                                 max_position_embeddings=131072, tie_word_embeddings=False),
}
GB = 1e9
TRAIN_BYTES = 16  # fp32 weights (master) + fp32 grads + two fp32 AdamW moments per trained parameter
FROZEN_BYTES = 4  # the stages keep fp32 parameters (bf16 autocast computes); frozen models: weights only


def plan(model: str, nodes: int, gpus_per_node: int, tp: int, gpu: str, mfu: float, bld_tokens: float,
         score_tokens: float, gkd_tokens: float, child_fraction: float) -> list[tuple[str, str]]:
    cfg = MODELS[model]
    space = default_search_space(cfg)[0]
    parent = cfg.parent_block()
    parent_names = {parent.attention.name, parent.ffn.name}
    trained = [v for v in space if v not in parent_names and subblock_params(cfg, v) > 0]
    p_parent = non_block_params(cfg) + cfg.num_layers * sum(subblock_params(cfg, v) for v in parent_names)
    p_trained_layer = sum(subblock_params(cfg, v) for v in trained)
    units = len(trained) * cfg.num_layers
    world = nodes * gpus_per_node
    dp = world // tp
    peak = get_gpu(gpu).peak_flops("bfloat16") * mfu
    hours = lambda flops: flops / peak / 3600  # noqa: E731  GPU-hours

    bld_flops = dp * 2 * p_parent * bld_tokens + 6 * p_trained_layer * cfg.num_layers * bld_tokens
    scored = len([v for v in space if v not in parent_names]) * cfg.num_layers
    score_flops = scored * 2 * (p_parent / 2) * score_tokens  # a replaced layer reruns half the model on average
    p_child = child_fraction * p_parent
    gkd_flops = 6 * p_child * gkd_tokens + 2 * p_parent * gkd_tokens
    bld_mem = (p_parent * FROZEN_BYTES + units / dp * (p_trained_layer / len(trained)) * TRAIN_BYTES) / tp
    rows = [
        ("parent parameters", f"{p_parent / 1e9:.2f} B ({p_parent * 2 / GB:.0f} GB in bf16)"),
        ("variants per layer (search space)", f"{len(space)}: {', '.join(space)}"),
        ("trained library entries", f"{units} ({len(trained)} per layer x {cfg.num_layers} layers)"),
        ("world / TP / DP groups", f"{world} GPUs / TP {tp} / {dp}"),
        ("import: memory per rank", f"{p_parent * FROZEN_BYTES / tp / GB:.1f} GB (fp32 weights / TP)"),
        ("BLD: memory per rank", f"{bld_mem / GB:.1f} GB (frozen parent + {units / dp:.0f} entries with AdamW)"),
        ("score: memory per rank", f"{p_parent * FROZEN_BYTES / tp / GB:.1f} GB (+ one candidate layer)"),
        ("GKD: memory per rank", f"{(p_child * TRAIN_BYTES + p_parent * FROZEN_BYTES) / tp / GB:.1f} GB "
                                 f"(child {p_child / 1e9:.1f} B with AdamW + frozen parent), no optimizer sharding"),
        ("BLD tokens / FLOPs / GPU-hours", f"{bld_tokens:.2g} / {bld_flops:.2e} / {hours(bld_flops):,.0f}"),
        ("score tokens / FLOPs / GPU-hours", f"{score_tokens:.2g} per entry / {score_flops:.2e} / {hours(score_flops):,.0f}"),
        ("GKD tokens / FLOPs / GPU-hours", f"{gkd_tokens:.2g} / {gkd_flops:.2e} / {hours(gkd_flops):,.0f}"),
        ("assumed rate", f"{mfu:.0%} of {get_gpu(gpu).full_name} dense bf16 peak = {peak / 1e12:.0f} TFLOP/s"),
    ]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="llama-3.1-70b")
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--gpu", default="h100-sxm")
    ap.add_argument("--mfu", type=float, default=0.35, help="assumed fraction of dense bf16 peak")
    ap.add_argument("--bld-tokens", type=float, default=1e9)
    ap.add_argument("--score-tokens", type=float, default=1e6)
    ap.add_argument("--gkd-tokens", type=float, default=45e9)
    ap.add_argument("--child-fraction", type=float, default=0.73, help="child params / parent params (51B/70B)")
    a = ap.parse_args(argv)
    if (a.nodes * a.gpus_per_node) % a.tp:
        ap.error("--tp must divide nodes x gpus-per-node")
    rows = plan(a.model, a.nodes, a.gpus_per_node, a.tp, a.gpu, a.mfu, a.bld_tokens, a.score_tokens, a.gkd_tokens,
                a.child_fraction)
    print(f"| {a.model} | |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
