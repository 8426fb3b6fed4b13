"""Options and logging shared by the benchmark scripts that judge models on the run's held-out text."""

from __future__ import annotations

import argparse
import logging


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
