"""The `data` stage: text corpora, token shards (train / calib / heldout) and batch loaders."""

from megatron_puzzle.data.loader import TokenBatches
from megatron_puzzle.data.shards import (
    DEFAULT_BUDGETS,
    SPLITS,
    CorpusTooSmallError,
    build_token_shards,
    load_split,
    read_meta,
)
from megatron_puzzle.data.sources import default_sample_path, load_corpus, web_module_dir

__all__ = [
    "DEFAULT_BUDGETS",
    "SPLITS",
    "CorpusTooSmallError",
    "TokenBatches",
    "build_token_shards",
    "default_sample_path",
    "load_corpus",
    "load_split",
    "read_meta",
    "web_module_dir",
]
