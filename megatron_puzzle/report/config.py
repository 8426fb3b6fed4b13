"""Settings of the eval stage: the `report` and `baselines` sections of RUN/config.yaml.

Every field has a default, so an absent section means "the defaults". The GKD budget
of the baselines is the child's own (RUN/gkd/config.json, else the run's `gkd`
section), with `baselines.gkd` overriding single fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..utils.config import from_section

BASELINES = ("width", "depth", "random")
DEFAULT_PROMPTS = (
    "The capital of France is",
    "In the beginning God created",
    "A good way to learn a new language is",
)


# Budgets of `quick: true` (a few seconds per step on a cut parent); explicit keys still win.
QUICK_REPORT = {"eval_tokens": 1024, "eval_seq_len": 64, "gen_tokens": 8, "throughput_repeats": 3,
                "throughput_max_repeats": 3}
QUICK_BASELINES = {"max_measurements": 3, "repeats": 2, "calib_tokens": 1024, "calib_seq_len": 64, "random_tries": 2}


def _from_dict(cls, d: dict | None, section: str, quick: dict | None = None):
    return from_section(cls, {**(quick or {}), **(d or {})}, section)


@dataclass
class ReportConfig:
    eval_tokens: int = 16384  # held-out tokens each model is evaluated on
    eval_seq_len: int = 256
    eval_batch_size: int = 4
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    gen_tokens: int = 24  # greedy tokens generated per prompt
    scenario: str | None = None  # preset or file; None: the scenario of RUN/measure/costs.json (else cpu-b8)
    throughput_warmup: int = 1
    throughput_repeats: int = 5  # timed rounds at least (report/speed.py); medians are reported
    throughput_max_repeats: int = 10  # ... and at most, until every speed ratio is known to +- throughput_halfwidth
    throughput_halfwidth: float = 0.03
    confidence: float = 0.95  # level of the speed ratios' intervals
    threads: int | None = None  # CPU intra-op threads while timing (None: torch's setting)
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    goal_speedup: float = 2.0  # the default run's goal: >= 2x decode throughput ...
    goal_accuracy_retained: float = 0.9  # ... keeping >= 90% of the parent's next-token accuracy
    progress: bool = True
    quick: bool = False  # small budgets (QUICK_REPORT, QUICK_BASELINES) for smoke runs

    def __post_init__(self):
        for name in ("eval_tokens", "eval_seq_len", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"report.{name} must be >= 1, got {getattr(self, name)}")
        if self.throughput_repeats < 2:
            raise ValueError(f"report.throughput_repeats must be >= 2 (a speed interval needs two rounds), "
                             f"got {self.throughput_repeats}")
        self.speed()  # its own checks
        if self.gen_tokens < 0 or self.throughput_warmup < 0:
            raise ValueError("report.gen_tokens and report.throughput_warmup must be >= 0")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ValueError(f"report.baselines: unknown baseline(s) {bad}; choose from {list(BASELINES)}")
        if not isinstance(self.prompts, list) or not all(isinstance(p, str) for p in self.prompts):
            raise ValueError("report.prompts must be a list of strings")

    def speed(self):
        """How the report times the models (report/speed.py)."""
        from .speed import SpeedConfig

        return SpeedConfig(warmup=self.throughput_warmup, min_rounds=self.throughput_repeats,
                           max_rounds=max(self.throughput_repeats, self.throughput_max_repeats),
                           halfwidth=self.throughput_halfwidth, level=self.confidence, threads=self.threads)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ReportConfig":
        return _from_dict(cls, d, "report", QUICK_REPORT if (d or {}).get("quick") else None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BaselinesConfig:
    tolerance: float = 0.05  # a baseline's measured decode tokens/s must be within this of the child's
    max_measurements: int = 6  # candidate architectures timed per baseline while matching
    repeats: int = 3  # timed rounds per matching measurement
    round_to: int = 64  # interpolated FFN sizes of the width baseline are multiples of this
    interpolate: bool = True  # width: also try FFN sizes between the library's (channel-contribution init)
    calib_tokens: int = 8192  # depth: calibration tokens for the Block Influence of each layer
    calib_seq_len: int = 256
    random_seed: int = 0
    random_tries: int = 4  # seeds tried until a random architecture lands within tolerance
    constraints: list[str] | None = None  # None: the child's (RUN/search/solutions.json)
    gkd: dict = field(default_factory=dict)  # overrides of the child's GKD settings (e.g. {"steps": 50})
    skip_gkd: bool = False  # evaluate baselines without GKD (the report says so)

    def __post_init__(self):
        if not 0 < self.tolerance < 1:
            raise ValueError(f"baselines.tolerance must be in (0, 1), got {self.tolerance}")
        for name in ("max_measurements", "repeats", "round_to", "calib_tokens", "calib_seq_len", "random_tries"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"baselines.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict | None, quick: bool = False) -> "BaselinesConfig":
        return _from_dict(cls, d, "baselines", QUICK_BASELINES if quick else None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_run_config(run_dir: str | Path, config: str | Path | dict | None = None) -> dict:
    """The whole run config: a dict as given, a YAML file, or RUN/config.yaml (empty if absent)."""
    import yaml

    if isinstance(config, dict):
        return config
    path = Path(config) if config else Path(run_dir) / "config.yaml"
    if config and not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping with one section per stage")
    return data


def load_report_config(run_dir: str | Path, config: str | Path | dict | None = None
                       ) -> tuple[ReportConfig, BaselinesConfig, dict]:
    """(report settings, baseline settings, the whole run config)."""
    data = read_run_config(run_dir, config)
    report = ReportConfig.from_dict(data.get("report"))
    return report, BaselinesConfig.from_dict(data.get("baselines"), quick=report.quick), data
