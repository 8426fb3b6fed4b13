"""The default search space: which subblock variants each layer may choose.

Attention: the parent's KV-head count and every smaller divisor of the query-head
count (GQA with fewer KV heads), linear, no-op. FFN: fractions of the parent's
intermediate size rounded to a multiple of `round_to`, linear, no-op. Every layer
gets the same list (the Puzzle default); later stages may prune per layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

from ..utils.config import from_section
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


# --------------------------------------------------------------------------- configured spaces


@dataclass
class SearchSpaceConfig:
    """A search space as written in a run config (YAML section `search_space`).

    `kv_heads`: KV-head counts to offer (default: the parent's and every smaller divisor
    of the query heads); counts above the parent's are refused. `ffn_fractions` of the
    parent's intermediate size, rounded to `round_to`, never above the parent's.
    `layers`: restrict the library to these layer indices (default: all).
    """

    kv_heads: list[int] | None = None
    attention_linear: bool = True
    attention_no_op: bool = True
    ffn_fractions: list[float] = field(default_factory=lambda: list(DEFAULT_FFN_FRACTIONS))
    ffn_linear: bool = True
    ffn_no_op: bool = True
    round_to: int = 64
    layers: list[int] | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> "SearchSpaceConfig":
        return from_section(cls, d, "search_space")

    def to_dict(self) -> dict:
        return asdict(self)

    def layer_indices(self, cfg: ModelConfig) -> list[int]:
        if self.layers is None:
            return list(range(cfg.num_layers))
        bad = [i for i in self.layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"search_space.layers {bad} are outside the parent's {cfg.num_layers} layers")
        return sorted(set(self.layers))

    def layer_names(self, cfg: ModelConfig) -> list[str]:
        """Variant names of one layer: attention variants then FFN variants."""
        if self.kv_heads is None:
            names = [n for n in attention_variant_names(cfg) if n.startswith("attn_kv")]
        else:
            for k in self.kv_heads:
                if k > cfg.num_kv_heads or cfg.num_attention_heads % k:
                    raise ValueError(f"search_space.kv_heads: {k} must divide the {cfg.num_attention_heads} query "
                                     f"heads and not exceed the parent's {cfg.num_kv_heads} KV heads")
            names = [AttentionVariant("full", k).name for k in sorted(set(self.kv_heads), reverse=True)]
        names += ["attn_linear"] * self.attention_linear + ["attn_no_op"] * self.attention_no_op
        names += [FFNVariant("full", m).name for m in ffn_sizes(cfg, self.ffn_fractions, self.round_to)]
        names += ["ffn_linear"] * self.ffn_linear + ["ffn_no_op"] * self.ffn_no_op
        return names


def configured_search_space(cfg: ModelConfig, space: SearchSpaceConfig | dict | None = None) -> list[list[str]]:
    """Variant names per layer from a search-space config; layers outside `space.layers` get []."""
    if not isinstance(space, SearchSpaceConfig):
        space = SearchSpaceConfig.from_dict(space)
    names = space.layer_names(cfg)
    chosen = set(space.layer_indices(cfg))
    return [list(names) if i in chosen else [] for i in range(cfg.num_layers)]


def load_search_space_config(path) -> SearchSpaceConfig:
    """The `search_space` section of a YAML run config (or a YAML file holding only that section)."""
    import yaml

    data = yaml.safe_load(open(path)) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping")
    # a full run config keeps the space under `search_space`; a bare file is the section itself
    own = {f.name for f in fields(SearchSpaceConfig)}
    return SearchSpaceConfig.from_dict(data if set(data) <= own else data.get("search_space"))
