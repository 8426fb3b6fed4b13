"""Search benchmark at the Puzzle paper's size: 80 layers x 54 block variants (6 attention x 9 FFN pairs).

Scores and costs are random but realistic (`megatron_puzzle.search.synthetic`: a bf16
Llama-70B-shaped model on an H100-like roofline, batch 64, 1024+1024 tokens). For each
solver it times 1 optimal solution (goal < 10 s) and 10 diverse solutions (goal < 60 s),
over a few seeds, and compares the greedy baseline's objective with the optimum.

    python benchmarks/bench_search.py [--seeds 3] [--min-diff 5] [--solvers highs,scipy,gurobi]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

from megatron_puzzle.search import greedy, problem_from_dicts, solve
from megatron_puzzle.search.problem import SearchError
from megatron_puzzle.search.synthetic import synthetic_run


def timed(fn):
    """(wall seconds, CPU seconds of this process, result): CPU time stays honest on a shared machine."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - t0, time.process_time() - c0), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--num-solutions", type=int, default=10)
    ap.add_argument("--min-diff", type=int, default=5)
    ap.add_argument("--solvers", default="highs,scipy,gurobi")
    ap.add_argument("--constraint", action="append", default=None,
                    help="default: throughput>=2.0x and memory<=0.6x (the parent needs ~171 GiB)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cons = args.constraint or ["throughput>=2.0x", "memory<=0.6x"]
    load0 = os.getloadavg()[0]

    rows = []
    for mode, coupled in (("pairs", True), ("decoupled", False)):
        problems = []
        for seed in range(args.seeds):
            scores, costs = synthetic_run(args.layers, coupled=coupled, seed=seed)
            problems.append(problem_from_dicts(scores, costs, mode=mode))
        p0 = problems[0]
        shape = f"{p0.num_layers} layers x {p0.num_options // p0.num_layers} options ({mode})"
        for solver in args.solvers.split(","):
            one, objs = _run(lambda p: solve(p, cons, solver=solver), problems)
            many, _ = _run(lambda p: solve(p, cons, solver=solver, num_solutions=args.num_solutions,
                                           min_diff=args.min_diff), problems)
            rows.append((shape, solver, one, many, objs))
        gt, gobj = [], []
        for p in problems:
            t, s = timed(lambda: greedy(p, cons))
            gt.append(t)
            gobj.append(s.objective)
        rows.append((shape, "greedy (baseline)", _stats(gt), "", f"{statistics.mean(gobj):.4f}"))

    print(f"constraints: {cons}; {args.seeds} seeds; {args.num_solutions} solutions differ in >= "
          f"{args.min_diff} layers; load average {load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("times: median wall / CPU seconds (max wall / CPU) over the seeds\n")
    header = ("problem", "solver", "1 optimal", f"{args.num_solutions} diverse", "mean objective (KL)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def _run(fn, problems) -> tuple[str, str]:
    """Time `fn` on every problem: (time cell, mean objective of the first solution), or why it cannot run."""
    times, objs = [], []
    for p in problems:
        try:
            t, sols = timed(lambda: fn(p))
        except SearchError as e:
            return f"refused: {str(e).split(': ', 1)[-1][:60]}", ""
        times.append(t)
        objs.append(sols[0].objective)
    return _stats(times), f"{statistics.mean(objs):.4f}"


def _stats(ts: list[tuple[float, float]]) -> str:
    wall, cpu = [w for w, _ in ts], [c for _, c in ts]
    return f"{statistics.median(wall):.2f} / {statistics.median(cpu):.2f} (max {max(wall):.2f} / {max(cpu):.2f})"


if __name__ == "__main__":
    main()
