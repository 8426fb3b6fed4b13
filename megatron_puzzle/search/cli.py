"""`megatron-puzzle search`: choose the child architecture by mixed-integer programming.

    megatron-puzzle search --run-dir RUN --constraint 'throughput>=2.0x' --constraint 'memory<=80GiB'
    megatron-puzzle search --library-stats stats.json --objective metrics.kl_div \\
        --constraint 'stats.memory_mib<=60000' --out solution.json
"""

from __future__ import annotations

import argparse
import json
import logging

from .constraints import fmt
from .problem import SearchError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="choose one variant per subblock per layer (MIP) under memory/throughput constraints",
        description="Minimise the summed replace-1-block scores subject to constraints on memory, throughput, "
                    "latency, time to first token, parameters or any cost/stats key (see docs/search.md).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="run directory: reads score/scores.json and measure/costs.json, "
                                       "writes search/")
    src.add_argument("--library-stats", metavar="FILE",
                     help="block-library stats JSON ({'layer_0': {'<block>': {'stats':..., 'metrics':...}}})")
    p.add_argument("--constraint", "-c", action="append", default=[], metavar="EXPR",
                   help="e.g. 'throughput>=2.0x', 'memory<=80GiB', 'params<=100M', 'latency<=1.5s', "
                        "'ttft<=200ms', 'stats.memory_mib<=60000' (repeatable)")
    p.add_argument("--objective", default=None,
                   help="metric to optimise (default kl_div; 'max:top1_agreement' to maximise)")
    sense = p.add_mutually_exclusive_group()
    sense.add_argument("--maximize", dest="sense", action="store_const", const="max")
    sense.add_argument("--minimize", dest="sense", action="store_const", const="min")
    p.add_argument("--num-solutions", type=int, default=1, metavar="K", help="K diverse solutions")
    p.add_argument("--min-diff", type=int, default=0, metavar="D",
                   help="each solution differs from every earlier one in at least D layers")
    p.add_argument("--pareto", metavar="Q:START:STOP:N", help="sweep targets, e.g. throughput:1.2x:3x:8")
    p.add_argument("--attention-floor", action="append", type=float, default=[], metavar="F",
                   help="add the best candidate keeping attention in at least F x the parent's layers, e.g. 0.35 "
                        "(repeatable; realize's `solution: best` picks among candidates by measured KL)")
    p.add_argument("--scores", help="scores.json (default RUN/score/scores.json)")
    p.add_argument("--costs", action="append", metavar="FILE",
                   help="costs.json (default RUN/measure/costs.json); repeat for several batch sizes")
    p.add_argument("--space", help="search space JSON (default RUN/library/space.json when present)")
    p.add_argument("--mode", choices=["auto", "decoupled", "pairs"], default="auto",
                   help="attention and FFN as two choices per layer, or as block pairs (auto: pairs for "
                        "coupled scores)")
    p.add_argument("--parent", help="the parent block, e.g. attn_kv8+ffn_28672 (default: largest KV and FFN)")
    p.add_argument("--solver", choices=["auto", "gurobi", "highs", "scipy"], default="auto")
    p.add_argument("--hidden-size", type=int, help="when RUN/parent/model_config.json is absent")
    p.add_argument("--num-heads", type=int, help="when RUN/parent/model_config.json is absent")
    p.add_argument("--out", help="output JSON for --library-stats")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from ..model.parallel import is_rank0

    if not is_rank0():  # one MIP solve, written by rank 0 (under torchrun the other ranks are done)
        log.info("search: rank 0 solves, this rank has nothing to do")
        return 0

    try:
        return _run(args)
    except SearchError as e:
        raise UserError(str(e)) from None


def _run(args: argparse.Namespace) -> int:
    from .run import SearchConfig, run_search, search_library_stats

    if args.num_solutions < 1 or args.min_diff < 0:
        raise SearchError("--num-solutions must be >= 1 and --min-diff >= 0")
    if args.library_stats:
        res = search_library_stats(
            args.library_stats, args.constraint, args.objective or "metrics.kl_div", sense=args.sense,
            out=args.out, num_solutions=args.num_solutions, min_diff=args.min_diff, parent=args.parent,
            solver=args.solver,
        )
        if not args.out:
            print(json.dumps(res, indent=2))
        for k, s in enumerate(res["solutions"]):
            totals = ", ".join(f"{q}={v:.6g}" for q, v in s["constrained"].items())
            log.info("solution %d: %s=%.6g %s", k, res["objective"], s["objective"], totals)
        return 0
    res = run_search(args.run_dir, SearchConfig(
        constraints=list(args.constraint or []), objective=args.objective or "kl_div", sense=args.sense,
        num_solutions=args.num_solutions, min_diff=args.min_diff, pareto=args.pareto, scores_path=args.scores,
        costs_paths=args.costs, space=args.space, mode=args.mode, parent=args.parent, solver=args.solver,
        hidden_size=args.hidden_size, num_attention_heads=args.num_heads, plots=not args.no_plots,
        seed=args.seed, attention_floors=list(args.attention_floor),
    ))
    for k, s in enumerate(res["solutions"]):
        t = s["totals"]
        parts = [f"{res['objective']}={s['objective']:.6g}"]
        if "throughput" in t:
            parts.append(f"throughput={fmt('throughput', t['throughput'])}"
                         + (f" ({t['throughput_vs_parent']:.2f}x)" if "throughput_vs_parent" in t else ""))
        if "decode_throughput" in t:
            parts.append(f"decode={fmt('decode_throughput', t['decode_throughput'])}"
                         + (f" ({t['decode_throughput_vs_parent']:.2f}x)" if "decode_throughput_vs_parent" in t else ""))
        if "memory_bytes" in t:
            parts.append(f"memory={fmt('memory', t['memory_bytes'])}")
        if "params" in t:
            parts.append(f"params={fmt('params', t['params'])}")
        if s.get("attention_floor") is not None:
            parts.append(f"attention_layers={t.get('attention_layers', float('nan')):.0f} "
                         f"(floor {s['attention_floor']:g}x)")
        log.info("solution %d (%s): %s", k, s["solver"], ", ".join(parts))
    log.info("wrote %s/search/solutions.json", args.run_dir)
    return 0
