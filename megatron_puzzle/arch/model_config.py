"""The shape of a Llama-family model: the parent, and the frame every child shares.

A child differs from its parent only in its per-layer `BlockConfig`s; hidden size,
heads, vocabulary, RoPE and norms stay the parent's. `ModelConfig` holds those
shared fields plus the block list, and maps to and from HF config dicts (Llama and
DeciLM / Nemotron-NAS).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .block_config import BlockConfig, BlockConfigError, blocks_from_json, blocks_to_json


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF llama3 dict: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    blocks: list[BlockConfig] = field(default_factory=list)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise BlockConfigError(f"model config: {name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_kv_heads:
            raise BlockConfigError(
                f"model config: num_kv_heads={self.num_kv_heads} does not divide num_attention_heads={self.num_attention_heads}"
            )
        if not self.blocks:
            self.blocks = [BlockConfig.parent(self.num_kv_heads, self.intermediate_size)] * self.num_layers
        if len(self.blocks) != self.num_layers:
            raise BlockConfigError(f"model config: {len(self.blocks)} block configs for {self.num_layers} layers")
        for i, b in enumerate(self.blocks):
            if b.attention.kind == "full" and self.num_attention_heads % b.attention.num_kv_heads:
                raise BlockConfigError(
                    f"block_configs[{i}].attention: {b.attention.num_kv_heads} KV heads do not divide "
                    f"{self.num_attention_heads} query heads"
                )

    # ------------------------------------------------------------------ derived
    @property
    def is_homogeneous_parent(self) -> bool:
        return all(b == BlockConfig.parent(self.num_kv_heads, self.intermediate_size) for b in self.blocks)

    def with_blocks(self, blocks: list[BlockConfig]) -> "ModelConfig":
        return replace(self, blocks=list(blocks))

    def parent_block(self) -> BlockConfig:
        return BlockConfig.parent(self.num_kv_heads, self.intermediate_size)

    def block_configs_json(self) -> list[dict]:
        return blocks_to_json(self.blocks, self.hidden_size, self.num_attention_heads)

    def rope_inv_freq(self):
        """Rotary inverse frequencies in float64, llama3 scaling applied (as HF computes them)."""
        import torch

        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        rs = self.rope_scaling
        if rs and rs.get("rope_type", rs.get("type")) == "llama3":
            factor = rs["factor"]
            lo, hi = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
            # transformers falls back to max_position_embeddings when the field is absent
            old = rs.get("original_max_position_embeddings", self.max_position_embeddings)
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > old / lo, inv / factor, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old / hi) & (wavelen <= old / lo)
            inv = torch.where(medium, smoothed, scaled)
        elif rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
            raise BlockConfigError(f"rope_scaling type {rs.get('rope_type', rs.get('type'))!r} is not supported (llama3 or none)")
        return inv

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = self.block_configs_json()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        raw_blocks = d.pop("blocks", None)
        cfg = cls(**d)
        if raw_blocks:
            cfg.blocks = blocks_from_json(
                raw_blocks, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                num_attention_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_kv_heads,
                intermediate_size=cfg.intermediate_size,
            )
        return cfg

    def save(self, path: str | Path) -> None:
        from ..utils.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """From a HF Llama or DeciLM / Nemotron-NAS config dict (transformers 4.x or 5.x keys)."""
        if hasattr(hf, "to_dict"):
            hf = hf.to_dict()
        mt = hf.get("model_type", "llama")
        if mt not in ("llama", "nemotron-nas", "deci", "decilm", "mistral"):
            raise BlockConfigError(f"unsupported model_type {mt!r}: expected a Llama-family or Nemotron-NAS config")
        rope = hf.get("rope_parameters") or {}
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        heads = hf["num_attention_heads"]
        kv = hf.get("num_key_value_heads") or heads
        inter = hf.get("intermediate_size")
        cfg = cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_kv_heads=kv,
            intermediate_size=inter or 4 * hf["hidden_size"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
        if "block_configs" in hf:
            blocks = blocks_from_json(
                hf["block_configs"], num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                num_attention_heads=heads, num_kv_heads=kv, intermediate_size=cfg.intermediate_size,
            )
            # A DeciLM config has no single parent FFN size / KV count: take the largest seen.
            fulls = [b.ffn.intermediate_size for b in blocks if b.ffn.kind == "full"]
            kvs = [b.attention.num_kv_heads for b in blocks if b.attention.kind == "full"]
            cfg = replace(
                cfg,
                intermediate_size=inter or (max(fulls) if fulls else cfg.intermediate_size),
                num_kv_heads=hf.get("num_key_value_heads") or (max(kvs) if kvs else heads),
                blocks=blocks,
            )
        return cfg
