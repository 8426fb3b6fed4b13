"""The `score` stage: replace-1-block scores (KL to the parent, LM loss, top-1 agreement)."""

from ..model.metrics import ALL_METRICS, METRICS, MetricSums, Reference
from .evaluate import assemble, evaluate_model, parent_references, score_architecture
from .library import LibraryError, library_weights, read_space
from .replace import Entry, ReplaceScorer, entry_block, split_batch
from .stage import ScoreConfig, Settings, entries_of, heldout_batches, run_score, score_space

__all__ = [
    "ALL_METRICS", "METRICS", "Entry", "LibraryError", "MetricSums", "Reference", "ReplaceScorer", "ScoreConfig",
    "Settings", "assemble", "entries_of", "entry_block", "evaluate_model", "heldout_batches", "library_weights",
    "parent_references", "read_space", "run_score", "score_architecture", "score_space", "split_batch",
]
