"""Options and logging shared by the benchmark scripts that judge models on the run's held-out text."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def add_eval_options(p: argparse.ArgumentParser) -> None:
    """Held-out evaluation as the report does it (4096 tokens in windows of 128), threads, progress bars."""
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-seq-len", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int)
    p.add_argument("--no-progress", action="store_true")


def setup_process(level: int = logging.INFO) -> None:
    """Logging as `megatron-puzzle` logs, and its host-memory setting for CPU runs: without it a
    benchmark's GKD steps page-fault their large tensors in anew each step and run ~1.4x slower than
    the pipeline's (utils/host_memory.py)."""
    from megatron_puzzle.utils.host_memory import keep_freed_memory

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    keep_freed_memory()


def run_gkd_settings(run: Path) -> dict:
    """The GKD settings a run used, so a benchmark trains as the run did: the `gkd` section of
    RUN/config.yaml (written resolved by `megatron-puzzle run`), else RUN/gkd/config.json (what its GKD
    stage recorded: a baseline's directory, RUN/baselines/NAME, has only that). Neither: SystemExit,
    since the built-in defaults (fp32, no LM term) would train another way than the run."""
    import json

    import yaml

    path = Path(run) / "config.yaml"
    if path.exists():
        return (yaml.safe_load(path.read_text()) or {}).get("gkd", {})
    recorded = Path(run) / "gkd" / "config.json"
    if recorded.exists():
        return json.loads(recorded.read_text())
    raise SystemExit(f"{run} has neither config.yaml nor gkd/config.json, so its GKD settings are unknown; "
                     f"give the run directory that `megatron-puzzle run` wrote")


def loss_weights(text: str) -> dict:
    """'cosine=1,kl=1,lm=0.5' -> {'cosine': 1.0, 'kl': 1.0, 'lm': 0.5}"""
    try:
        return {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise SystemExit(f"--loss wants term=weight pairs like cosine=1,kl=1,lm=0.5, got {text!r}") from None
