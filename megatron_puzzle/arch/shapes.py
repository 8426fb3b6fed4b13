"""Canonical tensor names and shapes of a model, per layer and per subblock variant.

One source of truth for what weights a variant owns: the converters, the block
library and the parameter counts all ask this module.
"""

from __future__ import annotations

from .block_config import AttentionVariant, FFNVariant
from .model_config import ModelConfig


def attention_shapes(cfg: ModelConfig, layer: int, v: AttentionVariant) -> dict[str, tuple[int, ...]]:
    p, h, d = f"model.layers.{layer}.", cfg.hidden_size, cfg.head_dim
    if v.kind == "no_op":
        return {}
    out = {p + "input_layernorm.weight": (h,)}
    if v.kind == "linear":
        out[p + "self_attn.linear_attn.weight"] = (h, h)
    else:
        out.update({
            p + "self_attn.q_proj.weight": (cfg.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (v.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": (v.num_kv_heads * d, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_attention_heads * d),
        })
    return out


def ffn_shapes(cfg: ModelConfig, layer: int, v: FFNVariant) -> dict[str, tuple[int, ...]]:
    p, h = f"model.layers.{layer}.", cfg.hidden_size
    if v.kind == "no_op":
        return {}
    out = {p + "post_attention_layernorm.weight": (h,)}
    if v.kind == "linear":
        out[p + "mlp.linear_mlp.weight"] = (h, h)
    else:
        m = v.intermediate_size
        out.update({p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h), p + "mlp.down_proj.weight": (h, m)})
    return out


def variant_shapes(cfg: ModelConfig, layer: int, v: AttentionVariant | FFNVariant) -> dict[str, tuple[int, ...]]:
    return attention_shapes(cfg, layer, v) if isinstance(v, AttentionVariant) else ffn_shapes(cfg, layer, v)


def non_block_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), "model.norm.weight": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return out


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    out = non_block_shapes(cfg)
    for i, b in enumerate(cfg.blocks):
        out.update(attention_shapes(cfg, i, b.attention))
        out.update(ffn_shapes(cfg, i, b.ffn))
    return out


def random_canonical(cfg: ModelConfig, seed: int = 0, std: float = 0.05) -> dict:
    """Random weights of the right shapes (norm weights near 1), for tests and benchmarks."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in canonical_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = std * torch.randn(shape, generator=g)
    return out
