#!/usr/bin/env python
"""A run config's budget: the memory plan of `megatron-puzzle plan`, and GPU-hours per stage from FLOPs.

Memory per GPU comes from `megatron_puzzle.plan` (the stages' own modules stepped on fake tensors).
Time is an estimate: FLOPs from parameter counts (6 x params x tokens to train, 2 x params x tokens
forward; attention-score FLOPs left out) at an assumed fraction (MFU) of the card's dense bf16 peak.

    python tools/plan_budget.py examples/configs/llama3.1-70b-h100-fp8.yaml
    python tools/plan_budget.py examples/configs/llama3.1-70b-h100-fp8.yaml --update docs/scale-out.md

`--update DOC` rewrites the block between `<!-- plan: CONFIG -->` and `<!-- /plan -->` in DOC.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from megatron_puzzle.arch.search_space import configured_search_space
from megatron_puzzle.cost.gpus import get_gpu
from megatron_puzzle.cost.memory import non_block_params, subblock_params
from megatron_puzzle.pipeline import config as run_config
from megatron_puzzle.plan.plan import bld_entries, layout, markdown, model_shape, plan_config


def gpu_hours_rows(cfg: dict, gpu: str, mfu: float, child_fraction: float) -> list[tuple[str, str, str, str]]:
    """(stage, tokens, FLOPs, GPU-hours) estimated from the config's token budgets."""
    shape = model_shape(cfg)
    parent = shape.parent_block()
    p_parent = non_block_params(shape) + shape.num_layers * sum(
        subblock_params(shape, v) for v in (parent.attention.name, parent.ffn.name))
    entries = bld_entries(cfg, shape)
    p_entries = sum(subblock_params(shape, v) for block, subs in entries
                    for v in ((block.attention.name,) if subs == ("attention",) else (block.ffn.name,)
                              if subs == ("ffn",) else (block.attention.name, block.ffn.name)))
    world, tp, pp, dp = layout(cfg)
    peak = get_gpu(gpu).peak_flops("bfloat16") * mfu
    bld, score, gkd = cfg["bld"], cfg["score"], cfg["gkd"]
    bld_tokens = bld["steps"] * bld["batch_size"] * bld["seq_len"]
    bld_flops = dp * 2 * p_parent * bld_tokens + 6 * p_entries * shape.num_layers * bld_tokens
    space = configured_search_space(shape, cfg.get("search_space"))
    scored = sum(len(names) - 2 for names in space)  # the parent's own two subblocks need no score
    score_flops = scored * 2 * (p_parent / 2) * score["tokens"]  # a replaced layer reruns half the model on average
    gkd_tokens = gkd.get("tokens") or gkd["steps"] * gkd["batch_size"] * gkd["seq_len"] * dp
    gkd_flops = 6 * child_fraction * p_parent * gkd_tokens + 2 * p_parent * gkd_tokens
    h = lambda flops: f"{flops / peak / 3600:,.0f}"  # noqa: E731
    return [("bld", f"{bld_tokens:.2g} per entry", f"{bld_flops:.1e}", h(bld_flops)),
            ("score", f"{score['tokens']:.2g} per entry, {scored} entries", f"{score_flops:.1e}", h(score_flops)),
            ("gkd", f"{gkd_tokens:.2g}", f"{gkd_flops:.1e}", h(gkd_flops))]


def report(config: str, gpu: str, mfu: float, child_fraction: float) -> str:
    cfg = run_config.load(config)
    result = plan_config(cfg)
    world, tp, pp, dp = layout(cfg)
    lines = [f"Planned (not measured) with `megatron-puzzle plan --config {config}`: {world} GPUs, "
             f"TP {tp} x PP {pp} x DP {dp}, bf16 weights, one rank per stage (the larger of the first and "
             "last pipeline stage).", "", markdown(result), "",
             f"GPU-hours estimated from FLOPs at {mfu:.0%} of the {get_gpu(gpu).full_name} dense bf16 peak "
             f"(child = {child_fraction:.0%} of the parent's parameters for GKD):", "",
             "| stage | tokens | FLOPs | GPU-hours |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in gpu_hours_rows(cfg, gpu, mfu, child_fraction)]
    return "\n".join(lines)


def update(doc: Path, config: str, text: str) -> None:
    pattern = re.compile(rf"(<!-- plan: {re.escape(config)} -->\n).*?(<!-- /plan -->)", re.DOTALL)
    old = doc.read_text()
    if not pattern.search(old):
        raise SystemExit(f"{doc} has no block <!-- plan: {config} --> ... <!-- /plan -->")
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(pattern.sub(lambda m: m.group(1) + text + "\n" + m.group(2), old))
    tmp.replace(doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="run config (YAML)")
    ap.add_argument("--gpu", default="h100-sxm", help="card whose bf16 peak the GPU-hours assume")
    ap.add_argument("--mfu", type=float, default=0.35, help="assumed fraction of the dense bf16 peak")
    ap.add_argument("--child-fraction", type=float, default=0.73, help="child / parent parameters (51B / 70B)")
    ap.add_argument("--update", type=Path, default=None, metavar="DOC", help="rewrite this config's block in DOC")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    text = report(a.config, a.gpu, a.mfu, a.child_fraction)
    if a.update:
        update(a.update, a.config, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
