"""`megatron-puzzle measure`: write RUN/measure/costs.json for the run's search space and a scenario."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..utils.io import DONE_MARKER, atomic_write_text, is_done, read_json
from .costs import CostsError, CostTable, load_costs, space_layers
from .gpus import Efficiency, UnknownGPUError
from .scenario import PRESETS, Scenario, ScenarioError, load_scenario

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


def _space(run_dir: Path, cfg):
    path = run_dir / "library" / "space.json"
    if path.exists():
        return space_layers(read_json(path))
    from ..arch.search_space import default_search_space

    log.info("no %s: using the default search space", path)
    return default_search_space(cfg)


def build_table(cfg, space, scenario: Scenario, source: str, args=None) -> CostTable:
    """Costs of every variant of `space` from the `source` ("measured" or "analytic")."""
    layers = space_layers(space)
    names = sorted({n for layer in layers for n in layer})
    if source == "analytic":
        from .analytic import AnalyticCostModel

        eff = Efficiency(getattr(args, "compute_efficiency", Efficiency.compute),
                         getattr(args, "memory_efficiency", Efficiency.memory))
        model = AnalyticCostModel(cfg, scenario, getattr(args, "gpu", None), eff)
        by_name = {n: model.variant_cost(n) for n in names}
        non_block = model.non_block_cost()
        device = model.device_info()
    else:
        from .measure import MeasuredCostModel

        model = MeasuredCostModel(
            cfg, scenario, warmup=getattr(args, "warmup", 2), repeats=getattr(args, "repeats", 5),
            threads=getattr(args, "threads", None), telemetry=not getattr(args, "no_telemetry", False),
            clock=getattr(args, "clock", "wall"), cuda_graphs=not getattr(args, "no_cuda_graphs", False),
        )
        log.info("timing %d variants and the non-block parts on %s", len(names), model.device)
        with model.session():
            model.measure(names)  # all variants interleaved, so background load hits them alike
            by_name = {n: model.variant_cost(n) for n in names}
            non_block = model.non_block_cost()
        device = model.device_info()
    return CostTable(scenario, source, device, non_block, [{n: by_name[n] for n in layer} for layer in layers],
                     parent=[[b.attention.name, b.ffn.name] for b in cfg.blocks])


def run(args: argparse.Namespace) -> int:
    from ..arch import ModelConfig
    from ..cli import UserError
    from .measure import MeasureError

    run_dir: Path = args.run_dir
    cfg_path = run_dir / "parent" / "model_config.json"
    if not cfg_path.exists():
        raise UserError(f"{cfg_path} not found: import a parent into {run_dir} first (megatron-puzzle import)")
    try:
        cfg = ModelConfig.load(cfg_path)
        scenario = load_scenario(args.scenario)
        space = _space(run_dir, cfg)
        source = args.source or ("measured" if scenario.is_local else "analytic")
        out_dir = run_dir / "measure"
        out = out_dir / "costs.json"
        if not args.force and is_done(out_dir) and out.exists() and source in ("measured", "analytic"):
            old = load_costs(out)
            if old.scenario == scenario and old.source == source and not _missing(old, space):
                print(f"{out} already holds {source} costs for scenario {scenario.name!r} (use --force to redo)")
                return 0
        if source in ("measured", "analytic"):
            table = build_table(cfg, space, scenario, source, args)
        else:
            table = load_costs(source, space, as_user_file=True)
            if table.scenario != scenario:
                raise UserError(
                    f"costs file {source} is for scenario {table.scenario.to_dict()}, not "
                    f"{scenario.to_dict()}; pass the matching --scenario or re-measure"
                )
    except (ScenarioError, UnknownGPUError, CostsError, MeasureError) as e:
        raise UserError(str(e)) from None
    table.save(out)
    atomic_write_text(out_dir / DONE_MARKER, "ok\n")
    _print_summary(table, out)
    return 0


def _missing(table: CostTable, space) -> bool:
    try:
        table.check_space(space)
    except CostsError:
        return True
    return False


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
