"""Timing jobs built from the project's DeciLM modeling code: the runtime that serves the final model.

Each subblock variant is timed as decoder layers whose other subblock is a no-op,
through `attention_subblock` / `ffn_subblock` (norm + mixer + residual, exactly what
the model runs per layer). A variant runs as a stack of copies whose weights
together exceed twice the last-level cache, so that, as inside a model, each copy
reads its weights from memory, not from cache, while the code path stays warm; the
time is per copy. The non-block parts (embedding, rotary tables, final norm,
LM head) are a zero-layer `DeciLMForCausalLM`. Prefill keeps logits of the last
position only (`logits_to_keep=1`, as `generate` does); a decode step runs one token
per sequence against a KV cache already holding `prefill_len + decode_len // 2` tokens.
Random weights: the time does not depend on their values.
"""

from __future__ import annotations

import torch

from ..arch import AttentionVariant, BlockConfig, FFNVariant, ModelConfig, blocks_to_json
from ..convert.hf_modeling.configuration_decilm import DeciLMConfig
from ..convert.hf_modeling.modeling_decilm import (
    DeciLMForCausalLM, DeciLMRotaryEmbedding, decilm_layer_modules,
)
from .measure import Job, last_level_cache_bytes
from .memory import as_variant, subblock_weight_bytes
from .scenario import Scenario

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def decilm_config(cfg: ModelConfig, blocks: list[BlockConfig] | None = None) -> DeciLMConfig:
    """The DeciLM config of `cfg` with its own blocks, or with `blocks` (any number, [] for none)."""
    blocks = cfg.blocks if blocks is None else list(blocks)
    return DeciLMConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=len(blocks), num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        block_configs=blocks_to_json(blocks, cfg.hidden_size, cfg.num_attention_heads),
    )


def fill_kv_cache(cache, layers: list[int], batch: int, length: int, kv_heads: list[int], head_dim: int,
                  dtype: torch.dtype, device: torch.device):
    """Put `length` random tokens of K and V into `cache` for each listed layer."""
    for i, g in zip(layers, kv_heads):
        k = torch.randn(batch, g, length, head_dim, dtype=dtype, device=device)
        cache.update(k, torch.randn_like(k), i)
    return cache


class DeciLMRuntime:
    """Jobs for `MeasuredCostModel`: subblocks, non-block parts and whole models of `cfg`."""

    def __init__(self, cfg: ModelConfig, scenario: Scenario, device: torch.device | str = "cpu",
                 max_stack: int = 64):
        from transformers.cache_utils import DynamicCache

        self.cfg, self.s, self.device = cfg, scenario, torch.device(device)
        self.dtype = TORCH_DTYPES[scenario.weight_dtype]
        self.kv_dtype = TORCH_DTYPES[scenario.kv_dtype]
        self._cache_cls = DynamicCache
        self.max_stack = max_stack
        self._stack_bytes = 2 * last_level_cache_bytes(self.device)
        self._layers: dict[str, list[torch.nn.Module]] = {}  # one stack per variant, shared by both phases
        self._models: dict[tuple | None, torch.nn.Module] = {}

    # ------------------------------------------------------------------ inputs
    def _tokens(self, phase: str) -> int:
        return self.s.prefill_len if phase == "prefill" else 1

    def _past(self, phase: str) -> int:
        return 0 if phase == "prefill" else self.s.mean_decode_context

    def _hidden(self, phase: str) -> torch.Tensor:
        return torch.randn(self.s.batch_size, self._tokens(phase), self.cfg.hidden_size,
                           dtype=self.dtype, device=self.device)

    def _positions(self, phase: str) -> torch.Tensor:
        t, past = self._tokens(phase), self._past(phase)
        return (torch.arange(t, device=self.device) + past).unsqueeze(0).expand(self.s.batch_size, t)

    def _module(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(device=self.device, dtype=self.dtype).eval()

    # ------------------------------------------------------------------ jobs
    def subblock_job(self, variant: str, phase: str) -> Job:
        v = as_variant(variant)
        if isinstance(v, AttentionVariant):
            block = BlockConfig(v, FFNVariant("no_op"))
        else:
            block = BlockConfig(AttentionVariant("no_op"), v)
        copies = self.stack_size(variant)
        config = decilm_config(self.cfg, [block] * copies)
        if variant not in self._layers:
            self._layers[variant] = [self._module(decilm_layer_modules(config, i)[0]) for i in range(copies)]
        stack = self._layers[variant]
        pos = DeciLMRotaryEmbedding(config)(self._positions(phase), self.dtype)  # per model: non-block
        if isinstance(v, FFNVariant):
            x = self._hidden(phase)

            def run_ffn(_):
                h = x
                for layer in stack:
                    h = layer.ffn_subblock(h)
                return h

            return Job(run=run_ffn, units=copies)

        def setup():
            cache = self._cache_cls()
            if phase == "decode" and v.kind == "full":
                fill_kv_cache(cache, list(range(copies)), self.s.batch_size, self._past(phase),
                              [v.num_kv_heads] * copies, self.cfg.head_dim, self.kv_dtype, self.device)
            return self._hidden(phase), cache

        def run_attention(state):
            h, cache = state
            for layer in stack:  # no mask: causal fast path in prefill; one query sees the whole cache
                h = layer.attention_subblock(h, pos, None, cache)
            return h

        return Job(run=run_attention, setup=setup, units=copies)

    def stack_size(self, variant: str) -> int:
        """Copies of `variant` whose weights together exceed twice the last-level cache."""
        per_copy = max(1, subblock_weight_bytes(self.cfg, variant, self.s))
        return max(1, min(self.max_stack, -(-self._stack_bytes // per_copy)))

    def non_block_job(self, phase: str) -> Job:
        return self.model_job([], phase)

    def model_job(self, blocks: list[BlockConfig] | None, phase: str) -> Job:
        """The whole `DeciLMForCausalLM` of `cfg` with `blocks` (None: cfg's own; []: zero layers)."""
        key = None if blocks is None else tuple(b.name for b in blocks)
        if key not in self._models:
            torch.manual_seed(0)
            self._models[key] = self._module(DeciLMForCausalLM(decilm_config(self.cfg, blocks)))
        model = self._models[key]
        layers = [(i, l.self_attn.num_kv_heads) for i, l in enumerate(model.model.layers) if l.uses_cache]
        b = self.s.batch_size

        def setup():
            ids = torch.randint(0, self.cfg.vocab_size, (b, self._tokens(phase)), device=self.device)
            cache = self._cache_cls()
            if phase == "decode" and layers:
                fill_kv_cache(cache, [i for i, _ in layers], b, self._past(phase), [g for _, g in layers],
                              self.cfg.head_dim, self.kv_dtype, self.device)
            return ids, cache

        return Job(run=lambda st: model(input_ids=st[0], cache=st[1], use_cache=True, logits_to_keep=1),
                   setup=setup)
