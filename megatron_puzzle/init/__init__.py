"""Variant initialisation from the parent: KV mean-pooling, channel-contribution pruning, linear fits."""

from .calibration import CalibrationStats, collect_calibration
from .variants import InitConfig, init_pair, init_variant, method_for, variant_seed

__all__ = ["CalibrationStats", "InitConfig", "collect_calibration", "init_pair", "init_variant", "method_for",
           "variant_seed"]
