"""`megatron-puzzle measure`: write RUN/measure/costs.json for the run's search space and a scenario."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .costs import CostsError, CostTable
from .gpus import Efficiency, UnknownGPUError
from .scenario import PRESETS, ScenarioError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "measure",
        help="per-variant costs (params, memory, prefill/decode time) for a deployment scenario",
        description="Cost every variant of the run's search space in a scenario, writing RUN/measure/costs.json.",
    )
    p.add_argument("--run-dir", required=True, type=Path, help="the run directory (needs parent/model_config.json)")
    p.add_argument("--scenario", required=True,
                   help=f"a YAML/JSON scenario file or a preset: {', '.join(PRESETS)}")
    p.add_argument("--source", default=None,
                   help="'measured' (time on this machine), 'analytic' (GPU roofline) or a costs.json FILE "
                        "given by you; default: measured for device cpu/cuda, analytic for a GPU profile")
    p.add_argument("--gpu", default=None, help="GPU profile for --source analytic (default: the scenario's device)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads while timing (default: torch's)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing each variant")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant (the median is kept)")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="CPU timer: wall clock, or this process's CPU time (steadier on a shared machine; "
                        "use with --threads 1)")
    p.add_argument("--no-telemetry", action="store_true", help="on CUDA, do not sample NVML telemetry")
    p.add_argument("--no-cuda-graphs", action="store_true", help="on CUDA, time decode steps eagerly, not from graphs")
    p.add_argument("--compute-efficiency", type=float, default=Efficiency.compute,
                   help="analytic: achievable fraction of peak FLOP/s")
    p.add_argument("--memory-efficiency", type=float, default=Efficiency.memory,
                   help="analytic: achievable fraction of memory bandwidth")
    p.add_argument("--force", action="store_true", help="measure again even if costs for this scenario exist")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from .measure import MeasureError
    from .stage import MeasureConfig, run_measure

    from ..model.parallel import is_rank0

    if not is_rank0():  # one process times (ranks timing at once would time each other); the rest are done
        log.info("measure: rank 0 measures, this rank has nothing to do")
        return 0
    mc = MeasureConfig(scenario=args.scenario, source=args.source, gpu=args.gpu, threads=args.threads,
                       warmup=args.warmup, repeats=args.repeats, clock=args.clock, telemetry=not args.no_telemetry,
                       cuda_graphs=not args.no_cuda_graphs,
                       compute_efficiency=args.compute_efficiency, memory_efficiency=args.memory_efficiency,
                       force=args.force)
    try:
        table, fresh = run_measure(args.run_dir, mc)
    except (ScenarioError, UnknownGPUError, CostsError, MeasureError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    out = args.run_dir / "measure" / "costs.json"
    if not fresh:
        print(f"{out} already holds {table.source} costs for scenario {table.scenario.name!r} (use --force to redo)")
        return 0
    _print_summary(table, out)
    return 0


def _print_summary(table: CostTable, out: Path) -> None:
    s = table.scenario
    print(f"{table.source} costs for scenario {s.name!r} ({s.batch_size} x {s.prefill_len}+{s.decode_len} tokens, "
          f"{s.weight_dtype}/{s.kv_dtype}, {s.device}) -> {out}")
    print(f"{'variant':>14} {'params':>12} {'weights MB':>11} {'KV MB':>9} {'prefill ms':>11} {'decode ms':>10}")
    seen = {}
    for layer in table.layers:
        seen.update(layer)
    for n, c in sorted(seen.items()):
        print(f"{n:>14} {c.params:12d} {c.weight_bytes / 1e6:11.2f} {c.kv_cache_bytes / 1e6:9.2f} "
              f"{c.prefill_time_s * 1e3:11.3f} {c.decode_time_s * 1e3:10.4f}")
    c = table.non_block
    print(f"{'non_block':>14} {c.params:12d} {c.weight_bytes / 1e6:11.2f} {0:9.2f} "
          f"{c.prefill_time_s * 1e3:11.3f} {c.decode_time_s * 1e3:10.4f}")
