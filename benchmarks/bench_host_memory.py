"""CPU GKD with glibc's own allocator against the kept-memory setting (utils/host_memory.py).

Uptrains a run's realized child (RUN/child against RUN/parent on RUN/data, the run's GKD
settings) for a few steps in a fresh process per measurement, once with glibc's default
mmap/trim behaviour and once with `keep_freed_memory()`, interleaved round by round
(system, kept, kept, system, ...) so a machine that changes speed slows both alike. Prints
the median tokens/s of the steps after the first two, the process's peak RSS, and the ratio
of the two settings' medians.

    python benchmarks/bench_host_memory.py --run-dir runs/default [--steps 10] [--rounds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("system", "kept")


def worker(run: Path, work: Path, mode: str, steps: int) -> dict:
    """One measurement in this process: GKD of RUN/child for `steps` steps under `mode`."""
    import csv
    import resource

    from megatron_puzzle.utils.host_memory import keep_freed_memory

    if mode == "kept" and not keep_freed_memory(force=True):
        raise SystemExit("glibc refused the mmap/trim thresholds: nothing to compare on this machine")
    from megatron_puzzle.distill.gkd import GKDConfig, run_gkd
    from megatron_puzzle.pipeline import config as run_config
    from megatron_puzzle.utils.io import read_json

    for name in ("child", "parent", "data"):
        (work / name).symlink_to((run / name).resolve())
    saved = run / "gkd" / "config.json"
    base = read_json(saved) if saved.exists() else run_config.load(run / "config.yaml")["gkd"]
    cfg = GKDConfig.from_dict({**base, "steps": steps, "save_interval": steps + 1, "progress": False,
                               "eval_tokens": 256})
    run_gkd(work, cfg)
    with open(work / "gkd" / "log.csv") as f:
        rates = [float(r["tokens_per_s"]) for r in csv.DictReader(f)][2:]
    return {"mode": mode, "tokens_per_s": statistics.median(rates),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a run with child/, parent/ and data/")
    p.add_argument("--steps", type=int, default=10, help="GKD steps per measurement (the first two are not counted)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each measuring both settings")
    p.add_argument("--out", type=Path, default=None, help="write the measurements as JSON here")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.run_dir, a.work, a.worker, a.steps)))
        return 0
    for name in ("child", "parent", "data"):
        if not (a.run_dir / name).exists():
            raise SystemExit(f"{a.run_dir / name} is missing: point --run-dir at a run that got through realize")
    if a.steps < 4:
        raise SystemExit("--steps must be at least 4 (the first two steps are not counted)")
    results = []
    for r in range(a.rounds):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            with tempfile.TemporaryDirectory() as tmp:
                out = subprocess.run([sys.executable, __file__, "--run-dir", str(a.run_dir), "--steps", str(a.steps),
                                      "--worker", mode, "--work", tmp], capture_output=True, text=True,
                                     env={**os.environ, "MEGATRON_PUZZLE_SYSTEM_MALLOC": "0"})
            if out.returncode:
                sys.stderr.write(out.stderr[-4000:])
                raise SystemExit(f"the {mode} measurement failed (exit {out.returncode})")
            res = {"round": r + 1, **json.loads(out.stdout.strip().splitlines()[-1])}
            print(f"round {res['round']} {mode:6s} {res['tokens_per_s']:7.1f} tokens/s  peak RSS "
                  f"{res['peak_rss_gib']:.2f} GiB", flush=True)
            results.append(res)
    med = {m: statistics.median(x["tokens_per_s"] for x in results if x["mode"] == m) for m in MODES}
    rss = {m: max(x["peak_rss_gib"] for x in results if x["mode"] == m) for m in MODES}
    print(f"\nGKD of {a.run_dir / 'child'}, {a.steps} steps a measurement, {a.rounds} rounds\n")
    print("| allocator | tokens/s (median of rounds) | peak RSS |\n|---|---|---|")
    print(f"| glibc default | {med['system']:.1f} | {rss['system']:.2f} GiB |")
    print(f"| freed memory kept (`utils/host_memory.py`) | {med['kept']:.1f} | {rss['kept']:.2f} GiB |")
    print(f"\nkept / default: {med['kept'] / med['system']:.2f}x tokens/s")
    if a.out:
        a.out.write_text(json.dumps({"steps": a.steps, "results": results, "median_tokens_per_s": med}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
