"""The data stage over a run directory: a corpus tokenized with the parent's tokenizer -> RUN/data.

Every rank works: under torchrun the ranks tokenize shares of the corpus and rank 0 writes the
shards (the same tokens as one process writes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils.config import from_section
from .shards import DEFAULT_BUDGETS, build_token_shards


@dataclass
class DataConfig:
    """The data stage's settings (the `data` section of a run config, and `megatron-puzzle data`)."""

    source: str = "web"  # web, sample, fortunes, or a path (text, JSONL, a directory of them)
    train_tokens: int = DEFAULT_BUDGETS["train"]
    calib_tokens: int = DEFAULT_BUDGETS["calib"]
    heldout_tokens: int = DEFAULT_BUDGETS["heldout"]
    seed: int = 0
    overwrite: bool = True  # replace RUN/data when it was built with other settings

    @classmethod
    def from_dict(cls, d: dict | None) -> "DataConfig":
        return from_section(cls, d, "data")


def run_data(run_dir: str | Path, cfg: DataConfig, tokenizer: Any = None, tokenizer_label: str | None = None) -> dict:
    """The data stage: writes RUN/data (token shards + meta.json + done); returns meta.json's content.

    `tokenizer` defaults to the one imported with the parent (RUN/parent/tokenizer).
    """
    run = Path(run_dir)
    if tokenizer is None:
        from ..convert.megatron_io import load_checkpoint_tokenizer

        tokenizer = load_checkpoint_tokenizer(run / "parent")
        if tokenizer is None:
            raise FileNotFoundError(f"{run / 'parent'} has no tokenizer; re-import the parent from a checkpoint "
                                    "with one, or pass --tokenizer")
    from ..model import parallel
    from .shards import read_meta

    if parallel.world_size() > 1:
        parallel.init_process_group()
    build_token_shards(run / "data", tokenizer, source=cfg.source, train_tokens=cfg.train_tokens,
                       calib_tokens=cfg.calib_tokens, heldout_tokens=cfg.heldout_tokens, seed=cfg.seed,
                       tokenizer_label=tokenizer_label, overwrite=cfg.overwrite)
    parallel.barrier()  # rank 0 has moved the shards into place
    return read_meta(run / "data")
