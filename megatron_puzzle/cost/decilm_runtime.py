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

On CUDA (unless `cuda_graphs=False`) a decode step is captured once into a CUDA graph
with a static KV cache (`StaticKVCache`: the past tokens plus the slot the step writes
in place) and replayed, as serving engines do; eager decode steps on a GPU are bound by
kernel launches. FP8 scenarios replace the subblocks' `nn.Linear` layers by Transformer
Engine's `Linear` with FP8 weights and run them under its FP8 autocast with the
scenario's recipe; the embedding and LM head stay in bfloat16, and attention and the KV cache run in bfloat16
(the memory costs count an FP8 KV cache; its time is that of a 16-bit one).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from ..arch import AttentionVariant, BlockConfig, FFNVariant, ModelConfig, blocks_to_json
from ..convert.hf_modeling.configuration_decilm import DeciLMConfig
from ..convert.hf_modeling.modeling_decilm import (
    DeciLMForCausalLM, DeciLMRotaryEmbedding, decilm_layer_modules,
)
from .jobs import Job, MeasureError, last_level_cache_bytes
from .memory import as_variant, subblock_weight_bytes
from .scenario import Scenario

# FP8 scenarios keep activations and the KV cache in bfloat16; their linear layers run in FP8 (TE).
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "fp8": torch.bfloat16}


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


def load_canonical(model: DeciLMForCausalLM, cfg: ModelConfig, tensors) -> None:
    """Copy canonical tensors into a `DeciLMForCausalLM` of `cfg`, one tensor at a time in the mapping's
    order: a `CanonicalView` of a Megatron model then holds one layer beside the runtime model, never a
    second copy of the whole model. Tied embeddings stay tied."""
    params = model.state_dict(keep_vars=True)
    names = list(tensors.keys())
    missing = [k for k in params if k not in tensors and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    unexpected = [k for k in names if k not in params]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the architecture: missing {missing[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        for k in names:
            t = tensors[k]
            if tuple(t.shape) != tuple(params[k].shape):
                raise ValueError(f"weights do not fit the architecture: {k} has shape {tuple(t.shape)}, "
                                 f"the model {tuple(params[k].shape)}")
            params[k].copy_(t)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def runtime_model(cfg: ModelConfig, tensors=None, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> DeciLMForCausalLM:
    """A `DeciLMForCausalLM` of `cfg` (canonical tensors loaded when given, else random), in eval mode.
    Seeds torch's generator (a random model is the same on every call)."""
    torch.manual_seed(0)
    model = DeciLMForCausalLM(decilm_config(cfg))
    if tensors is not None:
        load_canonical(model, cfg, tensors)
    return model.to(device=device, dtype=dtype).eval()


def fill_kv_cache(cache, layers: list[int], batch: int, length: int, kv_heads: list[int], head_dim: int,
                  dtype: torch.dtype, device: torch.device):
    """Put `length` random tokens of K and V into `cache` for each listed layer."""
    for i, g in zip(layers, kv_heads):
        k = torch.randn(batch, g, length, head_dim, dtype=dtype, device=device)
        cache.update(k, torch.randn_like(k), i)
    return cache


class StaticKVCache:
    """A decode step's KV cache in fixed storage: `past` tokens already held and one slot that the step
    writes in place, so that the step has static shapes and addresses and a CUDA graph can replay it.
    Holds what the DeciLM code asks of a transformers `Cache` (`update`, `get_seq_length`)."""

    def __init__(self, kv_heads: dict[int, int], batch: int, past: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.past = past
        self.k = {i: torch.randn(batch, g, past + 1, head_dim, dtype=dtype, device=device) for i, g in kv_heads.items()}
        self.v = {i: torch.randn_like(k) for i, k in self.k.items()}

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.k[layer_idx].narrow(2, self.past, k.shape[2]).copy_(k)
        self.v[layer_idx].narrow(2, self.past, v.shape[2]).copy_(v)
        return self.k[layer_idx], self.v[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past


def capture_cuda_graph(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    """`fn` captured into a CUDA graph, after warm-up runs on a side stream (as torch requires)."""
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    torch.cuda.synchronize()
    return graph


def te_linears(module: torch.nn.Module, recipe_name: str | None = None) -> torch.nn.Module:
    """Replace every `nn.Linear` inside `module` by Transformer Engine's `Linear` with the same weights.

    With `recipe_name`, the weights are stored in FP8 (TE's FP8 model init), as an FP8 deployment stores
    them: a GEMM then reads one byte per weight instead of casting 16-bit weights on every call.
    """
    import transformer_engine.pytorch as te

    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            w = child.weight
            with _fp8_weights(recipe_name):
                new = te.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                params_dtype=w.dtype, device=w.device)
            with torch.no_grad():
                new.weight.copy_(w)  # quantised into FP8 storage when the weights are FP8
                if child.bias is not None:
                    new.bias.copy_(child.bias)
            setattr(module, name, new.eval())
        else:
            te_linears(child, recipe_name)
    return module


def fp8_recipe(recipe_name: str):
    """Transformer Engine's recipe object: "delayed" (DelayedScaling) or "current" (Float8CurrentScaling)."""
    from transformer_engine.common import recipe

    if recipe_name == "current":
        return recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID)
    return recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID)


def _fp8_weights(recipe_name: str | None):
    """TE's context that creates modules with FP8 weights (`quantized_model_init`; older: `fp8_model_init`)."""
    if recipe_name is None:
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te

    init = getattr(te, "quantized_model_init", None) or te.fp8_model_init
    try:
        return init(enabled=True, recipe=fp8_recipe(recipe_name))
    except TypeError:  # older TE: no recipe argument (delayed scaling)
        return init(enabled=True)


def fp8_autocast(recipe_name: str):
    """Transformer Engine's FP8 autocast with the "delayed" or "current" scaling recipe."""
    import transformer_engine.pytorch as te

    rec = fp8_recipe(recipe_name)
    if hasattr(te, "autocast"):  # the newer name; fp8_autocast is deprecated there
        return te.autocast(enabled=True, recipe=rec)
    return te.fp8_autocast(enabled=True, fp8_recipe=rec)


class DeciLMRuntime:
    """Jobs for `MeasuredCostModel`: subblocks, non-block parts and whole models of `cfg`."""

    def __init__(self, cfg: ModelConfig, scenario: Scenario, device: torch.device | str = "cpu",
                 max_stack: int = 64, cuda_graphs: bool = True):
        from transformers.cache_utils import DynamicCache

        self.cfg, self.s, self.device = cfg, scenario, torch.device(device)
        self.dtype = TORCH_DTYPES[scenario.weight_dtype]
        self.kv_dtype = TORCH_DTYPES[scenario.kv_dtype]
        self.fp8 = scenario.weight_dtype == "fp8"
        if self.fp8 and (scenario.batch_size % 8 or cfg.hidden_size % 16):
            raise MeasureError(
                f"scenario {scenario.name!r}: FP8 GEMMs need the tokens of a step (batch_size {scenario.batch_size}) "
                f"to be a multiple of 8 and the hidden size ({cfg.hidden_size}) a multiple of 16; use such a batch"
            )
        self.graphs = cuda_graphs and self.device.type == "cuda"
        self._cache_cls = DynamicCache
        self.max_stack = max_stack
        self._stack_bytes = 2 * last_level_cache_bytes(self.device)
        self._layers: dict[str, list[torch.nn.Module]] = {}  # one stack per variant, shared by both phases
        self._models: dict[tuple | None, torch.nn.Module] = {}

    def timing_paths(self) -> dict[str, Any]:
        """What ran each phase, for the costs file."""
        out: dict[str, Any] = {"prefill": "eager", "decode": "cuda-graphs" if self.graphs else "eager"}
        if self.fp8:
            out.update(fp8="transformer-engine linear layers, fp8 weights", fp8_recipe=self.s.fp8_recipe,
                       attention_and_kv_cache_timed_in="bfloat16")
        return out

    def _context(self):
        return fp8_autocast(self.s.fp8_recipe) if self.fp8 else contextlib.nullcontext()

    def _job(self, fn: Callable[[Any], Any], phase: str, setup: Callable[[], Any] | None = None, units: int = 1,
             light_setup: bool = True) -> Job:
        """A job running `fn(state)` in this scenario's precision; a decode step with `setup=None` is
        replayed from a CUDA graph when graphs are on."""
        def run(state):
            with self._context():
                return fn(state)

        if phase == "decode" and self.graphs and setup is None:
            graph = capture_cuda_graph(lambda: run(None))
            return Job(run=lambda _: graph.replay(), units=units)
        return Job(run=run, setup=setup or (lambda: None), units=units, light_setup=light_setup)

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

    def _module(self, module: torch.nn.Module, fp8: bool = False) -> torch.nn.Module:
        module = module.to(device=self.device, dtype=self.dtype).eval()
        return te_linears(module, self.s.fp8_recipe) if fp8 else module

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
            self._layers[variant] = [self._module(decilm_layer_modules(config, i)[0], self.fp8) for i in range(copies)]
        stack = self._layers[variant]
        pos = DeciLMRotaryEmbedding(config)(self._positions(phase), self.dtype)  # per model: non-block
        x = self._hidden(phase)  # the inputs' values do not change the time: made once
        if isinstance(v, FFNVariant):
            def run_ffn(_):
                h = x
                for layer in stack:
                    h = layer.ffn_subblock(h)
                return h

            return self._job(run_ffn, phase, units=copies)

        def run_attention(state):
            h, cache = state
            for layer in stack:  # no mask: causal fast path in prefill; one query sees the whole cache
                h = layer.attention_subblock(h, pos, None, cache)
            return h

        past, full = self._past(phase), v.kind == "full"
        if phase == "decode" and self.graphs:
            cache = StaticKVCache({i: v.num_kv_heads for i in range(copies)} if full else {},
                                  self.s.batch_size, past, self.cfg.head_dim, self.kv_dtype, self.device)
            return self._job(lambda _: run_attention((x, cache)), phase, units=copies)

        def setup():
            cache = self._cache_cls()
            if phase == "decode" and full:
                fill_kv_cache(cache, list(range(copies)), self.s.batch_size, past,
                              [v.num_kv_heads] * copies, self.cfg.head_dim, self.kv_dtype, self.device)
            return x, cache

        # an eager decode step's setup fills the whole KV cache: no energy figure for it
        return self._job(run_attention, phase, setup=setup, units=copies, light_setup=not (phase == "decode" and full))

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
            model = self._module(DeciLMForCausalLM(decilm_config(self.cfg, blocks)))
            if self.fp8:  # the decoder layers in FP8; embedding and LM head stay 16-bit
                for layer in model.model.layers:
                    te_linears(layer, self.s.fp8_recipe)
            self._models[key] = model
        model = self._models[key]
        layers = [(i, l.self_attn.num_kv_heads) for i, l in enumerate(model.model.layers) if l.uses_cache]
        b, past = self.s.batch_size, self._past(phase)

        def forward(state):
            return model(input_ids=state[0], cache=state[1], use_cache=True, logits_to_keep=1)

        if phase == "decode" and self.graphs:
            ids = torch.randint(0, self.cfg.vocab_size, (b, 1), device=self.device)
            cache = StaticKVCache(dict(layers), b, past, self.cfg.head_dim, self.kv_dtype, self.device)
            return self._job(lambda _: forward((ids, cache)), phase)

        def setup():
            ids = torch.randint(0, self.cfg.vocab_size, (b, self._tokens(phase)), device=self.device)
            cache = self._cache_cls()
            if phase == "decode" and layers:
                fill_kv_cache(cache, [i for i, _ in layers], b, past, [g for _, g in layers],
                              self.cfg.head_dim, self.kv_dtype, self.device)
            return ids, cache

        return self._job(forward, phase, setup=setup, light_setup=not (phase == "decode" and layers))
