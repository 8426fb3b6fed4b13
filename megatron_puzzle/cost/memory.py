"""Parameter counts and memory of each subblock variant and of the non-block parts.

Counts follow the canonical weights of docs/formats.md (no biases): an attention
entry holds its `input_layernorm` and q/k/v/o (or `linear_attn`); an FFN entry holds
`post_attention_layernorm` and gate/up/down (or `linear_mlp`); no-op entries hold
nothing. The KV cache of a layer stores K and V for every token of every sequence:
2 x batch x (prefill_len + decode_len) x kv_heads x head_dim x bytes.
"""

from __future__ import annotations

from ..arch import AttentionVariant, FFNVariant, ModelConfig, variant_from_name
from .scenario import Scenario, dtype_bytes

Variant = AttentionVariant | FFNVariant


def as_variant(variant: str | Variant) -> Variant:
    return variant_from_name(variant) if isinstance(variant, str) else variant


def subblock_params(cfg: ModelConfig, variant: str | Variant) -> int:
    """Parameters of one subblock variant, its norm included."""
    v = as_variant(variant)
    h = cfg.hidden_size
    if v.kind == "no_op":
        return 0
    if v.kind == "linear":
        return h * h + h
    if isinstance(v, AttentionVariant):
        q_out = cfg.num_attention_heads * cfg.head_dim
        kv_out = v.num_kv_heads * cfg.head_dim
        return h * q_out + 2 * h * kv_out + q_out * h + h
    return 3 * h * v.intermediate_size + h


def kv_cache_bytes(cfg: ModelConfig, variant: str | Variant, scenario: Scenario, tokens: int | None = None) -> int:
    """KV cache of one layer's attention for `tokens` per sequence (default: prefill + decode)."""
    v = as_variant(variant)
    if not isinstance(v, AttentionVariant) or v.kind != "full":
        return 0
    tokens = scenario.cache_len if tokens is None else tokens
    return 2 * scenario.batch_size * tokens * v.num_kv_heads * cfg.head_dim * dtype_bytes(scenario.kv_dtype)


def non_block_weight_dtype(scenario: Scenario) -> str:
    """Embeddings and LM head stay in 16 bits when the blocks are FP8 (as FP8 deployments keep them)."""
    return "bfloat16" if scenario.weight_dtype == "fp8" else scenario.weight_dtype


def non_block_params(cfg: ModelConfig) -> int:
    """Embedding + final norm + LM head (absent when tied to the embedding)."""
    emb = cfg.vocab_size * cfg.hidden_size
    return emb + cfg.hidden_size + (0 if cfg.tie_word_embeddings else emb)


def subblock_weight_bytes(cfg: ModelConfig, variant: str | Variant, scenario: Scenario) -> int:
    return subblock_params(cfg, variant) * dtype_bytes(scenario.weight_dtype)


def non_block_weight_bytes(cfg: ModelConfig, scenario: Scenario) -> int:
    return non_block_params(cfg) * dtype_bytes(non_block_weight_dtype(scenario))
