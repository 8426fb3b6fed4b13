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


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def run_gkd_settings(run: Path) -> dict:
    """The run's own `gkd` section (RUN/config.yaml, written resolved by `megatron-puzzle run`), so a
    benchmark trains with the settings the run used; {} when the run has no config.yaml."""
    import yaml

    path = Path(run) / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}).get("gkd", {}) if path.exists() else {}


def loss_weights(text: str) -> dict:
    """'cosine=1,kl=1,lm=0.5' -> {'cosine': 1.0, 'kl': 1.0, 'lm': 0.5}"""
    try:
        return {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise SystemExit(f"--loss wants term=weight pairs like cosine=1,kl=1,lm=0.5, got {text!r}") from None
