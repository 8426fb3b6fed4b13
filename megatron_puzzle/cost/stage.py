"""The measure stage over a run directory: RUN/measure/costs.json for the run's search space and a scenario.

Only rank 0 works (timing on several ranks at once would measure their contention); under
torchrun the pipeline keeps the other ranks at a barrier meanwhile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils.config import from_section
from ..utils.io import DONE_MARKER, atomic_write_json, atomic_write_text, is_done, read_json
from .costs import CostsError, CostTable, load_costs, space_layers
from .gpus import Efficiency
from .scenario import Scenario, load_scenario

log = logging.getLogger(__name__)


@dataclass
class MeasureConfig:
    """The measure stage's settings (the `measure` section of a run config plus its `scenario`)."""

    scenario: Any = "cpu-b8"  # a preset name, a YAML/JSON file, or a mapping of Scenario fields
    source: str | None = None  # measured | analytic | a costs.json file; default by the scenario's device
    gpu: str | None = None  # GPU profile for analytic costs (default: the scenario's device)
    threads: int | None = None  # CPU threads while timing
    warmup: int = 2
    repeats: int = 5
    clock: str = "wall"  # wall | process (CPU timer)
    telemetry: bool = True  # NVML telemetry on CUDA
    cuda_graphs: bool = True  # on CUDA, time decode steps replayed from CUDA graphs (False: eagerly)
    compute_efficiency: float = Efficiency.compute
    memory_efficiency: float = Efficiency.memory
    force: bool = False  # measure again even if costs for this scenario exist

    @classmethod
    def from_dict(cls, d: dict | None) -> "MeasureConfig":
        return from_section(cls, d, "measure")


def _space(run_dir: Path, cfg):
    path = run_dir / "library" / "space.json"
    if path.exists():
        return space_layers(read_json(path))
    from ..arch.search_space import default_search_space

    log.info("no %s: using the default search space", path)
    return default_search_space(cfg)


def _scenario(run_dir: Path, spec: Any) -> Scenario:
    if isinstance(spec, dict):  # load_scenario takes a preset or a file: keep the mapping beside the costs
        path = run_dir / "measure" / "scenario.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, spec)
        spec = str(path)
    return load_scenario(spec)


def build_table(cfg, space, scenario: Scenario, source: str, mc: MeasureConfig | None = None) -> CostTable:
    """Costs of every variant of `space` from the `source` ("measured" or "analytic")."""
    mc = mc or MeasureConfig()
    layers = space_layers(space)
    names = sorted({n for layer in layers for n in layer})
    if source == "analytic":
        from .analytic import AnalyticCostModel

        model = AnalyticCostModel(cfg, scenario, mc.gpu, Efficiency(mc.compute_efficiency, mc.memory_efficiency))
        by_name = {n: model.variant_cost(n) for n in names}
        non_block = model.non_block_cost()
        device = model.device_info()
    else:
        from .measure import MeasuredCostModel

        model = MeasuredCostModel(cfg, scenario, warmup=mc.warmup, repeats=mc.repeats, threads=mc.threads,
                                  telemetry=mc.telemetry, clock=mc.clock, cuda_graphs=mc.cuda_graphs)
        log.info("timing %d variants and the non-block parts on %s", len(names), model.device)
        with model.session():
            model.measure(names)  # all variants interleaved, so background load hits them alike
            by_name = {n: model.variant_cost(n) for n in names}
            non_block = model.non_block_cost()
        device = model.device_info()
    return CostTable(scenario, source, device, non_block, [{n: by_name[n] for n in layer} for layer in layers],
                     parent=[[b.attention.name, b.ffn.name] for b in cfg.blocks])


def run_measure(run_dir: str | Path, mc: MeasureConfig) -> tuple[CostTable, bool]:
    """The measure stage: writes RUN/measure/costs.json and its done marker. Rank 0 only.

    Returns the table and whether it was (re)computed (False: the existing costs already fit).
    """
    from ..arch import ModelConfig

    run = Path(run_dir)
    cfg_path = run / "parent" / "model_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: import a parent into {run} first (megatron-puzzle import)")
    cfg = ModelConfig.load(cfg_path)
    scenario = _scenario(run, mc.scenario)
    space = _space(run, cfg)
    source = mc.source or ("measured" if scenario.is_local else "analytic")
    out_dir = run / "measure"
    out = out_dir / "costs.json"
    if not mc.force and is_done(out_dir) and out.exists() and source in ("measured", "analytic"):
        old = load_costs(out)
        if old.scenario == scenario and old.source == source and not _missing(old, space):
            log.info("%s already holds %s costs for scenario %r (force to redo)", out, source, scenario.name)
            return old, False
    if source in ("measured", "analytic"):
        table = build_table(cfg, space, scenario, source, mc)
    else:
        table = load_costs(source, space, as_user_file=True)
        if table.scenario != scenario:
            raise CostsError(f"costs file {source} is for scenario {table.scenario.to_dict()}, not "
                             f"{scenario.to_dict()}; pass the matching scenario or re-measure")
    (out_dir / DONE_MARKER).unlink(missing_ok=True)  # the old marker must not vouch for a half-replaced table
    table.save(out)
    atomic_write_text(out_dir / DONE_MARKER, "ok\n")
    return table, True


def _missing(table: CostTable, space) -> bool:
    try:
        table.check_space(space)
    except CostsError:
        return True
    return False
