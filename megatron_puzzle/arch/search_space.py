"""The default search space: which subblock variants each layer may choose.

Attention: the parent's KV-head count and every smaller divisor of the query-head
count (GQA with fewer KV heads), linear, no-op. FFN: fractions of the parent's
intermediate size rounded to a multiple of `round_to`, linear, no-op. Every layer
gets the same list (the Puzzle default); later stages may prune per layer.
"""

from __future__ import annotations

from typing import Sequence

from .block_config import AttentionVariant, FFNVariant
from .model_config import ModelConfig

DEFAULT_FFN_FRACTIONS = (1.0, 0.87, 0.75, 0.5, 0.25, 0.2, 0.1)


def attention_variant_names(cfg: ModelConfig) -> list[str]:
    kvs = [k for k in range(cfg.num_kv_heads, 0, -1) if cfg.num_attention_heads % k == 0]
    names = [AttentionVariant("full", k).name for k in kvs]
    return names + [AttentionVariant("linear").name, AttentionVariant("no_op").name]


def ffn_sizes(cfg: ModelConfig, fractions: Sequence[float], round_to: int) -> list[int]:
    """Intermediate sizes for `fractions` of the parent's, largest first, without duplicates.

    A fraction of 1.0 keeps the parent's exact size; others round to the nearest multiple
    of `round_to` (at least `round_to`), which keeps matmuls aligned for GPU kernels.
    """
    if round_to <= 0:
        raise ValueError(f"round_to must be a positive integer, got {round_to}")
    sizes = []
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"FFN fractions must be in (0, 1], got {f}")
        if f == 1.0:
            size = cfg.intermediate_size
        else:
            size = max(round_to, int(round(f * cfg.intermediate_size / round_to)) * round_to)
            size = min(size, cfg.intermediate_size)
        sizes.append(size)
    return sorted(set(sizes), reverse=True)


def ffn_variant_names(cfg: ModelConfig, fractions: Sequence[float] = DEFAULT_FFN_FRACTIONS, round_to: int = 64) -> list[str]:
    names = [FFNVariant("full", m).name for m in ffn_sizes(cfg, fractions, round_to)]
    return names + [FFNVariant("linear").name, FFNVariant("no_op").name]


def default_search_space(
    cfg: ModelConfig, ffn_fractions: Sequence[float] = DEFAULT_FFN_FRACTIONS, round_to: int = 64
) -> list[list[str]]:
    """Variant names per layer: attention variants then FFN variants, the same for every layer."""
    layer = attention_variant_names(cfg) + ffn_variant_names(cfg, ffn_fractions, round_to)
    return [list(layer) for _ in range(cfg.num_layers)]
