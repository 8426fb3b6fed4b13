"""Configuration of a DeciLM / Nemotron-NAS model: a Llama whose layers differ.

Each layer has its own attention (GQA with its own KV-head count, a linear
hidden -> hidden map, or nothing) and its own FFN (SwiGLU with its own width, a
linear map, or nothing), listed in `block_configs`. Everything else (embeddings,
heads, RoPE, norms) is shared, as in Llama.

This file is copied into exported model directories, so it imports only torch
and transformers.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

# Entries with these keys are understood; any other key must be null or false.
_ATTENTION_KEYS = {"no_op", "replace_with_linear", "n_heads_in_group", "num_query_groups"}
_FFN_KEYS = {"no_op", "replace_with_linear", "ffn_mult", "ffn_hidden_size", "intermediate_size"}


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int, multiple: int = 256) -> int:
    """The DeciLM rule: int(2 * ffn_mult * hidden / 3) rounded up to a multiple of 256."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return size if size % multiple == 0 else size + multiple - size % multiple


def _check_unknown(d: dict, known: set, where: str) -> None:
    for key, value in d.items():
        if key not in known and value not in (None, False):
            raise ValueError(f"{where}.{key}={value!r} is not supported by this DeciLM implementation")


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 14336,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        rope_theta: float | None = None,
        rope_scaling: dict | None = None,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        tie_word_embeddings: bool = False,
        block_configs: list[dict] | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs: Any,
    ):
        if hidden_act != "silu":
            raise ValueError(f"hidden_act={hidden_act!r}: only SwiGLU ('silu') FFNs are supported")
        if attention_bias or mlp_bias:
            raise ValueError("attention_bias / mlp_bias are not supported (DeciLM projections have no bias)")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = False
        self.mlp_bias = False
        self.rope_parameters = self._merge_rope(rope_theta, rope_scaling, rope_parameters)
        if block_configs is None:
            block_configs = [
                {"attention": {"num_query_groups": self.num_key_value_heads},
                 "ffn": {"ffn_hidden_size": intermediate_size}}
            ] * num_hidden_layers
        self.block_configs = [dict(b) for b in block_configs]
        self.layer_variants()  # validate early, with a message naming the layer
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @staticmethod
    def _merge_rope(theta: float | None, scaling: dict | None, params: dict | None) -> dict:
        """One dict with rope_type, rope_theta and the scaling fields, from either config dialect."""
        rope = dict(params or {})
        if scaling:
            rope.update(scaling)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.setdefault("rope_type", "default")
        if theta is not None:
            rope["rope_theta"] = float(theta)
        rope.setdefault("rope_theta", 10000.0)
        if rope["rope_type"] not in ("default", "llama3"):
            raise ValueError(f"rope type {rope['rope_type']!r} is not supported (use 'default' or 'llama3')")
        return rope

    def layer_variants(self) -> list[tuple[tuple[str, int | None], tuple[str, int | None]]]:
        """Per layer: ((attention kind, KV heads), (FFN kind, intermediate size)).

        Kinds are "full", "linear", "no_op". Readers take `num_query_groups` before
        `n_heads_in_group`, and `ffn_hidden_size` before `ffn_mult`.
        """
        if len(self.block_configs) != self.num_hidden_layers:
            raise ValueError(
                f"block_configs has {len(self.block_configs)} entries but num_hidden_layers={self.num_hidden_layers}"
            )
        return [self._parse_block(i, b) for i, b in enumerate(self.block_configs)]

    def _parse_block(self, i: int, block: dict):
        where = f"block_configs[{i}]"
        attn, ffn = block.get("attention"), block.get("ffn", block.get("mlp"))
        if not isinstance(attn, dict) or not isinstance(ffn, dict):
            raise ValueError(f"{where} needs 'attention' and 'ffn' objects")
        _check_unknown(attn, _ATTENTION_KEYS, f"{where}.attention")
        _check_unknown(ffn, _FFN_KEYS, f"{where}.ffn")

        if attn.get("no_op") and attn.get("replace_with_linear"):
            raise ValueError(f"{where}.attention: no_op and replace_with_linear are both true")
        if attn.get("no_op"):
            attention = ("no_op", None)
        elif attn.get("replace_with_linear"):
            attention = ("linear", None)
        else:
            if attn.get("num_query_groups") is not None:
                kv = int(attn["num_query_groups"])
            elif attn.get("n_heads_in_group") is not None:
                kv = self.num_attention_heads // int(attn["n_heads_in_group"])
            else:
                kv = self.num_key_value_heads
            if kv <= 0 or self.num_attention_heads % kv:
                raise ValueError(f"{where}.attention: {kv} KV heads do not divide {self.num_attention_heads} query heads")
            attention = ("full", kv)

        if ffn.get("no_op") and ffn.get("replace_with_linear"):
            raise ValueError(f"{where}.ffn: no_op and replace_with_linear are both true")
        if ffn.get("no_op"):
            mlp = ("no_op", None)
        elif ffn.get("replace_with_linear"):
            mlp = ("linear", None)
        else:
            exact = ffn.get("ffn_hidden_size", ffn.get("intermediate_size"))
            if exact is not None:
                size = int(exact)
            elif ffn.get("ffn_mult") is not None:
                mult = float(ffn["ffn_mult"])
                if not math.isfinite(mult) or mult <= 0:
                    raise ValueError(f"{where}.ffn.ffn_mult must be a positive number, got {mult}")
                size = ffn_mult_to_intermediate_size(mult, self.hidden_size)
            else:
                size = self.intermediate_size
            if size <= 0:
                raise ValueError(f"{where}.ffn: intermediate size must be positive, got {size}")
            mlp = ("full", size)
        return attention, mlp


__all__ = ["DeciLMConfig", "ffn_mult_to_intermediate_size"]
