"""Initial canonical weights of one (layer, variant), by the method the init config selects.

Every variant keeps the parent's norm weight. Parent variants (the parent's KV
count, the parent's FFN size) are the parent's own tensors; no-op variants have
none. Random initialisation replaces only the tensors the variant reshapes
(K and V for fewer KV heads, the whole FFN for a narrower one, the linear map),
so the ablation isolates what the training-free methods contribute.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import torch

from ..arch import AttentionVariant, FFNVariant, ModelConfig, variant_from_name
from ..utils.config import from_section
from . import methods
from .calibration import CalibrationStats

KV_METHODS = ("mean_pool", "random")
FFN_PRUNE_METHODS = ("channel_contribution", "truncate", "random")
ATTN_LINEAR_METHODS = ("vo", "random")
FFN_LINEAR_METHODS = ("lstsq", "up_down", "random")


@dataclass
class InitConfig:
    kv: str = "mean_pool"
    ffn_prune: str = "channel_contribution"
    attn_linear: str = "vo"
    ffn_linear: str = "lstsq"
    random_std: float = 0.02  # Megatron-Core's default init std
    lstsq_ridge: float = 1e-2  # relative to the mean diagonal of X^T X; keeps few-token fits from overfitting
    calib_batches: int = 8

    def __post_init__(self):
        for name, allowed in (("kv", KV_METHODS), ("ffn_prune", FFN_PRUNE_METHODS),
                              ("attn_linear", ATTN_LINEAR_METHODS), ("ffn_linear", FFN_LINEAR_METHODS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"init.{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "InitConfig":
        return from_section(cls, d, "init")

    def to_dict(self) -> dict:
        return asdict(self)

    def random_everywhere(self) -> "InitConfig":
        return InitConfig(kv="random", ffn_prune="random", attn_linear="random", ffn_linear="random",
                          random_std=self.random_std, lstsq_ridge=self.lstsq_ridge, calib_batches=self.calib_batches)

    def needs(self) -> tuple[bool, bool]:
        """(channel statistics, least-squares statistics) this config needs from calibration."""
        return self.ffn_prune == "channel_contribution", self.ffn_linear == "lstsq"


def variant_seed(seed: int, layer: int, name: str) -> int:
    """A seed of its own for each (layer, variant): independent of rank count and order."""
    return zlib.crc32(f"{seed}/{layer}/{name}".encode()) & 0x7FFFFFFF


def method_for(cfg: ModelConfig, variant, init: InitConfig) -> str:
    """The init method a variant gets: 'parent', 'no_op' or one of the configured methods."""
    if variant.kind == "no_op":
        return "no_op"
    if isinstance(variant, AttentionVariant):
        if variant.kind == "linear":
            return init.attn_linear
        return "parent" if variant.num_kv_heads == cfg.num_kv_heads else init.kv
    if variant.kind == "linear":
        return init.ffn_linear
    return "parent" if variant.intermediate_size == cfg.intermediate_size else init.ffn_prune


def init_variant(cfg: ModelConfig, parent: dict[str, torch.Tensor], layer: int, variant: AttentionVariant | FFNVariant | str,
                 init: InitConfig, stats: CalibrationStats | None = None, seed: int = 0) -> tuple[dict[str, torch.Tensor], str]:
    """(canonical tensors of the variant at `layer`, method used)."""
    if isinstance(variant, str):
        variant = variant_from_name(variant)
    method = method_for(cfg, variant, init)
    p = f"model.layers.{layer}."
    gen = torch.Generator().manual_seed(variant_seed(seed, layer, variant.name))
    rnd = lambda shape: methods.random_like_std(shape, gen, init.random_std)  # noqa: E731
    h, d, H = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
    if method == "no_op":
        return {}, method

    if isinstance(variant, AttentionVariant):
        a = p + "self_attn."
        out = {p + "input_layernorm.weight": parent[p + "input_layernorm.weight"].clone()}
        if variant.kind == "linear":
            w = (rnd((h, h)) if method == "random"
                 else methods.linear_attention_from_vo(parent[a + "v_proj.weight"], parent[a + "o_proj.weight"], H, d))
            out[a + "linear_attn.weight"] = w
            return out, method
        out[a + "q_proj.weight"] = parent[a + "q_proj.weight"].clone()
        out[a + "o_proj.weight"] = parent[a + "o_proj.weight"].clone()
        kv = variant.num_kv_heads
        if method == "parent":
            k, v = parent[a + "k_proj.weight"].clone(), parent[a + "v_proj.weight"].clone()
        elif method == "random":
            k, v = rnd((kv * d, h)), rnd((kv * d, h))
        else:
            k, v = methods.mean_pool_kv(parent[a + "k_proj.weight"], parent[a + "v_proj.weight"], H, kv, d)
        out[a + "k_proj.weight"], out[a + "v_proj.weight"] = k, v
        return out, method

    m = p + "mlp."
    out = {p + "post_attention_layernorm.weight": parent[p + "post_attention_layernorm.weight"].clone()}
    gate, up, down = (parent[m + f"{n}_proj.weight"] for n in ("gate", "up", "down"))
    if variant.kind == "linear":
        if method == "random":
            w = rnd((h, h))
        elif method == "up_down":
            w = methods.linear_ffn_up_down(up, down)
        else:
            if stats is None or not stats.lstsq:
                raise ValueError("least-squares linear FFN init needs calibration statistics")
            w = stats.lstsq[layer].solve(init.lstsq_ridge)
        out[m + "linear_mlp.weight"] = w
        return out, method
    size = variant.intermediate_size
    if size > cfg.intermediate_size:
        raise ValueError(f"{variant.name} is wider than the parent's FFN ({cfg.intermediate_size})")
    if method == "parent":
        g, u, dn = gate.clone(), up.clone(), down.clone()
    elif method == "random":
        g, u, dn = rnd((size, h)), rnd((size, h)), rnd((h, size))
    elif method == "truncate":
        g, u, dn = methods.truncate_ffn(gate, up, down, size)
    else:
        if stats is None or not stats.abs_act_sum:
            raise ValueError("channel-contribution pruning needs calibration statistics")
        scores = methods.channel_contribution(stats.mean_abs_activation(layer), down)
        g, u, dn = methods.prune_ffn(gate, up, down, methods.top_channels(scores, size))
    out.update({m + "gate_proj.weight": g, m + "up_proj.weight": u, m + "down_proj.weight": dn})
    return out, method


def init_pair(cfg: ModelConfig, parent, layer: int, pair_name: str, init: InitConfig, stats=None, seed: int = 0):
    """Both subblocks of a coupled pair `attn_X+ffn_Y`; the method is 'attn-method+ffn-method'."""
    attn, ffn = pair_name.split("+")
    ta, ma = init_variant(cfg, parent, layer, attn, init, stats, seed)
    tf, mf = init_variant(cfg, parent, layer, ffn, init, stats, seed)
    return {**ta, **tf}, f"{ma}+{mf}"
