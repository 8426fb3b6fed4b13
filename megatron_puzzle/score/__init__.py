"""The `score` stage: replace-1-block scores (KL to the parent, LM loss, top-1 agreement)."""

from .evaluate import assemble, evaluate_model, parent_references, score_architecture
from .library import LibraryError, library_weights, read_space
from ..model.metrics import ALL_METRICS, METRICS, MetricSums, Reference
from .replace import ReplaceScorer, candidate_block, split_batch
from .stage import ScoreConfig, Settings, heldout_batches, items_of, run_score, score_space

__all__ = [
    "ALL_METRICS", "METRICS", "LibraryError", "MetricSums", "Reference", "ReplaceScorer", "Settings", "assemble",
    "candidate_block", "evaluate_model", "heldout_batches", "items_of", "library_weights", "parent_references", "read_space", "run_score",
    "ScoreConfig", "score_architecture", "score_space", "split_batch",
]
