"""Block configs, variant names, model shape: the vocabulary every stage shares."""

from .block_config import (
    AttentionVariant,
    BlockConfig,
    BlockConfigError,
    FFNVariant,
    blocks_from_json,
    blocks_to_json,
    describe,
    ffn_mult_to_intermediate_size,
    intermediate_size_to_ffn_mult,
    variant_from_name,
)
from .model_config import ModelConfig

__all__ = [
    "AttentionVariant", "BlockConfig", "BlockConfigError", "FFNVariant", "ModelConfig",
    "blocks_from_json", "blocks_to_json", "describe", "ffn_mult_to_intermediate_size",
    "intermediate_size_to_ffn_mult", "variant_from_name",
]
