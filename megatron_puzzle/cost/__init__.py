"""Hardware costs of subblock variants in a deployment scenario (the "measure" stage)."""

from .costs import Cost, CostsError, CostTable, load_costs, space_layers
from .gpus import GPUS, Efficiency, GPUProfile, UnknownGPUError, get_gpu
from .scenario import PRESETS, Scenario, ScenarioError, load_scenario

__all__ = [
    "Cost", "CostTable", "CostsError", "Efficiency", "GPUProfile", "GPUS", "PRESETS", "Scenario",
    "ScenarioError", "UnknownGPUError", "get_gpu", "load_costs", "load_scenario", "space_layers",
]
