"""DeciLM / Nemotron-NAS for transformers: a Llama whose layers each choose their subblocks.

Per layer (from `config.block_configs`):

- attention: GQA with the layer's own KV-head count (`self_attn.{q,k,v,o}_proj`),
  linear (`self_attn.linear_attn`, hidden -> hidden), or no-op (no
  `input_layernorm` either);
- FFN: SwiGLU with the layer's own width (`mlp.{gate,up,down}_proj`), linear
  (`mlp.linear_mlp`), or no-op (no `post_attention_layernorm` either).

RoPE uses HF's rotate-half layout; RMSNorm and the residual stream are Llama's.

KV cache: only full-attention layers write to the cache, each with its own
KV-head count. A no-op or linear layer never touches it, so the cache's layer 0
may be empty: the model reads the past length from its first full-attention layer
instead, and builds positions and masks from that.

Subblocks can be run (and timed) alone: `decilm_layer_modules(config, layer_idx)`
gives one decoder layer and the rotary embedding; `layer.attention_subblock(...)`
and `layer.ffn_subblock(...)` each run norm + mixer + residual.

This file is copied into exported model directories, so it imports only torch,
transformers and its sibling configuration file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_decilm import DeciLMConfig

_TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
_SDPA_GQA = _TORCH_VERSION >= (2, 5)  # scaled_dot_product_attention(enable_gqa=...) exists


# --------------------------------------------------------------------------- shared pieces


class DeciLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the weight dtype, as Llama does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: DeciLMConfig) -> torch.Tensor:
    """Rotary inverse frequencies (float64), llama3 scaling applied when configured."""
    rope = config.rope_parameters
    d = config.head_dim
    inv = 1.0 / (rope["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if rope["rope_type"] == "llama3":
        factor = rope["factor"]
        lo, hi = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        old = rope.get("original_max_position_embeddings", config.max_position_embeddings)
        wavelen = 2 * math.pi / inv
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        between = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(between, blended, scaled)
    return inv


class DeciLMRotaryEmbedding(nn.Module):
    """(cos, sin) of shape [batch, seq, head_dim] for given positions.

    The frequencies are kept as a plain attribute, not a buffer, so that loading
    on the meta device never leaves them uninitialised.
    """

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.config = config
        self._inv_freq: torch.Tensor | None = None

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq is None or self._inv_freq.device != position_ids.device:
            self._inv_freq = rope_inv_freq(self.config).float().to(position_ids.device)
        freqs = position_ids[..., None].float() * self._inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos, sin: [batch, seq, head_dim]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    query_length: int,
    past_length: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Additive mask [batch, 1, query, past + query] (0 keep, dtype-min drop), or None if plain causal.

    `attention_mask` is the usual 2-D padding mask over past + current tokens (1 keep,
    0 pad), or None. A 4-D mask is passed through (bool masks become additive).
    Without padding, None is returned for a single query (it sees every key) and for
    a prompt with no past (the attention then uses SDPA's causal fast path).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return torch.zeros(attention_mask.shape, dtype=dtype, device=device).masked_fill(
                ~attention_mask, torch.finfo(dtype).min
            )
        return attention_mask.to(dtype)
    kv_length = past_length + query_length
    padded = attention_mask is not None and not bool(attention_mask[:, -kv_length:].all())
    if not padded and (query_length == 1 or past_length == 0):
        return None
    q_pos = torch.arange(query_length, device=device)[:, None] + past_length
    keep = torch.arange(kv_length, device=device)[None, :] <= q_pos  # [query, kv]
    keep = keep[None, None]
    if attention_mask is not None:
        if attention_mask.shape[-1] < kv_length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens but past + current is {kv_length}"
            )
        keep = keep & attention_mask[:, None, None, -kv_length:].bool()
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)


# --------------------------------------------------------------------------- subblock mixers


class DeciLMAttention(nn.Module):
    """Grouped-query attention with this layer's own number of KV heads."""

    def __init__(self, config: DeciLMConfig, layer_idx: int, num_kv_heads: int):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = d
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # Without a mask: causal when the queries are the whole sequence, else all keys are visible
        # (a single decode step, or chunks whose mask the caller supplies).
        is_causal = attention_mask is None and t > 1 and k.shape[2] == t
        groups = self.num_heads // self.num_kv_heads
        if groups > 1 and _SDPA_GQA:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=is_causal, enable_gqa=True)
        else:
            if groups > 1:  # query head i reads KV head i // groups
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class DeciLMLinearAttention(nn.Module):
    """Attention replaced by one hidden -> hidden matrix (each token sees only itself)."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.linear_attn(x)


class DeciLMMLP(nn.Module):
    """SwiGLU FFN with this layer's own intermediate size."""

    def __init__(self, config: DeciLMConfig, intermediate_size: int):
        super().__init__()
        h = config.hidden_size
        self.gate_proj = nn.Linear(h, intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeciLMLinearMLP(nn.Module):
    """FFN replaced by one hidden -> hidden matrix."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(x)


# --------------------------------------------------------------------------- layer


class DeciLMDecoderLayer(nn.Module):
    """One block. Norms and mixers sit directly on the layer so that parameter names
    match published Nemotron-NAS checkpoints; a no-op subblock has neither."""

    def __init__(self, config: DeciLMConfig, layer_idx: int):
        super().__init__()
        (attn_kind, kv_heads), (ffn_kind, ffn_size) = config.layer_variants()[layer_idx]
        self.layer_idx = layer_idx
        self.attention_kind, self.ffn_kind = attn_kind, ffn_kind
        if attn_kind != "no_op":
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.self_attn = (
                DeciLMAttention(config, layer_idx, kv_heads) if attn_kind == "full" else DeciLMLinearAttention(config)
            )
        if ffn_kind != "no_op":
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp = DeciLMMLP(config, ffn_size) if ffn_kind == "full" else DeciLMLinearMLP(config)

    @property
    def uses_cache(self) -> bool:
        return self.attention_kind == "full"

    def attention_subblock(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """hidden + attention(norm(hidden)); identity for a no-op attention."""
        if self.attention_kind == "no_op":
            return hidden_states
        return hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache
        )

    def ffn_subblock(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden + ffn(norm(hidden)); identity for a no-op FFN."""
        if self.ffn_kind == "no_op":
            return hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None):
        hidden_states = self.attention_subblock(hidden_states, position_embeddings, attention_mask, cache)
        return self.ffn_subblock(hidden_states)


def decilm_layer_modules(config: DeciLMConfig, layer_idx: int = 0) -> tuple[DeciLMDecoderLayer, DeciLMRotaryEmbedding]:
    """One decoder layer of `config` (randomly initialised) and the rotary embedding it needs.

    For timing single subblocks with the same code the exported model runs:

        layer, rope = decilm_layer_modules(cfg, i)
        pos = rope(position_ids, dtype)                       # position_ids: [batch, seq]
        y = layer.attention_subblock(x, pos, mask, cache)     # mask from build_attention_mask
        y = layer.ffn_subblock(x)

    `cache` is any transformers `Cache` (e.g. `DynamicCache()`); only full attention uses it.
    """
    layer = DeciLMDecoderLayer(config, layer_idx)
    std = config.initializer_range
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
    return layer, DeciLMRotaryEmbedding(config)


# --------------------------------------------------------------------------- models


def _output(cls, cache, **fields):
    """Build a model output whose cache field is named as this transformers version names it."""
    names = getattr(cls, "__dataclass_fields__", {})
    fields["cache" if "cache" in names else "past_key_values"] = cache
    return cls(**fields)


def _cache_of(output):
    return output.get("cache" if "cache" in getattr(type(output), "__dataclass_fields__", {}) else "past_key_values")


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DeciLMDecoderLayer"]
    _supports_sdpa = True


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DeciLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DeciLMRotaryEmbedding(config)
        # The cache's past length is read here: layer 0 may hold no KV at all.
        self._first_kv_layer = next((i for i, l in enumerate(self.layers) if l.uses_cache), None)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def past_length(self, cache: Cache | None) -> int:
        """Tokens already in the cache, from the first layer that stores KV (0 if none does)."""
        if cache is None or self._first_kv_layer is None:
            return 0
        return int(cache.get_seq_length(self._first_kv_layer))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states

        b, t, _ = inputs_embeds.shape
        past = self.past_length(cache)
        if position_ids is None:
            position_ids = (torch.arange(t, device=inputs_embeds.device) + past).unsqueeze(0).expand(b, t)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(b, t)
        mask = build_attention_mask(attention_mask, t, past, inputs_embeds.dtype, inputs_embeds.device)
        rope = self.rotary_emb(position_ids, inputs_embeds.dtype)

        hidden = inputs_embeds
        all_hidden = (hidden,) if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, rope, mask, cache)
            if output_hidden_states:
                all_hidden += (hidden,)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden,)
        return _output(BaseModelOutputWithPast, cache, last_hidden_state=hidden, hidden_states=all_hidden)


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # Next-token loss; -100 marks ignored positions, as in transformers.
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        result = _output(CausalLMOutputWithPast, _cache_of(out), loss=loss, logits=logits, hidden_states=out.hidden_states)
        if return_dict is False:
            return result.to_tuple()
        return result


__all__ = [
    "DeciLMConfig",
    "DeciLMDecoderLayer",
    "DeciLMForCausalLM",
    "DeciLMModel",
    "DeciLMPreTrainedModel",
    "DeciLMRotaryEmbedding",
    "build_attention_mask",
    "decilm_layer_modules",
]
