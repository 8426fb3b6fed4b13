"""Check the additive cost model: a whole model's time against the sum of its variants' costs.

For random child architectures of the default parent (SmolLM2-135M's shape, random
weights), time the whole `DeciLMForCausalLM` (prefill of the prompt batch, one decode
step with a KV cache) and compare with non_block + the sum of the measured costs of
its variants, all on this CPU with the same runtime. All jobs are timed round-robin
so that background load hits predictions and measurements alike.

    python benchmarks/bench_cost_model.py [--children 5] [--rounds 5] [--write-docs]

Prints a table and the median absolute error; with --write-docs, replaces the
results section of docs/costs.md.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from megatron_puzzle.arch import AttentionVariant, BlockConfig, FFNVariant, ModelConfig
from megatron_puzzle.arch.search_space import attention_variant_names, ffn_variant_names
from megatron_puzzle.cost.measure import NON_BLOCK, PHASES, MeasuredCostModel, time_interleaved
from megatron_puzzle.cost.scenario import Scenario

DOCS = Path(__file__).resolve().parents[1] / "docs" / "costs.md"
START, END = "<!-- bench_cost_model:start -->", "<!-- bench_cost_model:end -->"


def default_parent() -> ModelConfig:
    """SmolLM2-135M's shape (the project's default parent)."""
    return ModelConfig(
        vocab_size=49152, hidden_size=576, num_layers=30, num_attention_heads=9, num_kv_heads=3,
        intermediate_size=1536, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
    )


def random_child(cfg: ModelConfig, rng: random.Random) -> list[BlockConfig]:
    attn, ffn = attention_variant_names(cfg), ffn_variant_names(cfg)
    return [BlockConfig(AttentionVariant.from_name(rng.choice(attn)), FFNVariant.from_name(rng.choice(ffn)))
            for _ in range(cfg.num_layers)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--children", type=int, default=5, help="random child architectures (the parent is added)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (medians are taken over them)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="CPU timer; 'process' (with --threads 1) resists other load on a shared machine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-docs", action="store_true", help=f"write the results into {DOCS}")
    args = ap.parse_args(argv)

    t_start = time.time()
    cfg = default_parent()
    scenario = Scenario(f"cpu-b{args.batch}", args.batch, args.prefill, args.decode, "float32", "float32", "cpu")
    rng = random.Random(args.seed)
    archs = {"parent": list(cfg.blocks)}
    archs.update({f"child{i}": random_child(cfg, rng) for i in range(args.children)})

    model = MeasuredCostModel(cfg, scenario, threads=args.threads, warmup=1, repeats=args.rounds, clock=args.clock)
    rt = model.runtime
    names = sorted({v.name for blocks in archs.values() for b in blocks for v in (b.attention, b.ffn)
                    if v.kind != "no_op"})
    jobs = {}
    for phase in PHASES:
        jobs[NON_BLOCK, phase] = rt.non_block_job(phase)
        for n in names:
            jobs[n, phase] = rt.subblock_job(n, phase)
        for a, blocks in archs.items():
            jobs[("model", a), phase] = rt.model_job(blocks, phase)
    with torch.inference_mode():
        old = torch.get_num_threads()
        if args.threads:
            torch.set_num_threads(args.threads)
        t = time_interleaved(jobs, model.device, warmup=1, rounds=args.rounds, flush=model.flush, clock=args.clock)
        torch.set_num_threads(old)

    rows = []
    for a, blocks in archs.items():
        row = {"arch": a, "params_M": sum(p.numel() for p in rt._models[tuple(b.name for b in blocks)].parameters()) / 1e6}
        for phase in PHASES:
            pred = t[NON_BLOCK, phase] + sum(t.get((v.name, phase), 0.0) for b in blocks for v in (b.attention, b.ffn))
            meas = t[("model", a), phase]
            row[phase] = (pred, meas, 100.0 * (pred - meas) / meas)
        rows.append(row)

    lines = [
        f"Scenario: batch {args.batch}, prefill {args.prefill}, decode {args.decode}, float32, CPU "
        f"({model.device_info()['name']}, {args.threads or torch.get_num_threads()} threads, {args.clock} clock), "
        f"torch {torch.__version__}; {args.rounds} interleaved rounds, median.",
        "",
        "| model | params (M) | prefill predicted (ms) | prefill measured (ms) | error | "
        "decode step predicted (ms) | decode step measured (ms) | error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        (pp, pm, pe), (dp, dm, de) = r["prefill"], r["decode"]
        lines.append(f"| {r['arch']} | {r['params_M']:.1f} | {pp * 1e3:.1f} | {pm * 1e3:.1f} | {pe:+.1f}% | "
                     f"{dp * 1e3:.2f} | {dm * 1e3:.2f} | {de:+.1f}% |")
    med = {p: statistics.median(abs(r[p][2]) for r in rows) for p in PHASES}
    lines += ["", f"Median absolute error: prefill {med['prefill']:.1f}%, decode step {med['decode']:.1f}% "
                  f"(goal: within 10%). Benchmark wall time: {time.time() - t_start:.0f} s."]
    text = "\n".join(lines)
    print(text)
    print("\nper-variant medians (ms): " + ", ".join(
        f"{n} {t[n, 'prefill'] * 1e3:.1f}/{t[n, 'decode'] * 1e3:.2f}" for n in [NON_BLOCK] + names))

    if args.write_docs:
        doc = DOCS.read_text()
        if START not in doc or END not in doc:
            print(f"{DOCS} has no {START} ... {END} section to replace", file=sys.stderr)
            return 1
        block = f"{START}\n{text}\n{END}"
        DOCS.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S))
    return 0


if __name__ == "__main__":
    sys.exit(main())
