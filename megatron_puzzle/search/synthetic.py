"""Random but realistic scores.json / costs.json dicts, for tests and benchmarks.

Costs follow a bf16 Llama-style model on an H100-like roofline (decode is memory
bound: weights + KV cache read per step; prefill is compute bound). Scores grow
with how much a variant removes, scaled by a random per-layer sensitivity, as
replace-1-block KL divergences do.
"""

from __future__ import annotations

import numpy as np

_BW = 3.35e12  # bytes/s (HBM)
_FLOPS = 9.9e14  # bf16 dense FLOP/s


def synthetic_run(
    num_layers: int = 80,
    *,
    hidden_size: int = 8192,
    num_heads: int = 64,
    kv_options=(8, 4, 2, 1),
    ffn_fractions=(1.0, 0.75, 0.5, 0.375, 0.25, 0.125, 0.0625),
    intermediate_size: int = 28672,
    batch_size: int = 64,
    prefill_len: int = 1024,
    decode_len: int = 1024,
    vocab_size: int = 128256,
    coupled: bool = False,
    seed: int = 0,
) -> tuple[dict, dict]:
    """(scores, costs) in the docs/formats.md layout; 6 attention x 9 FFN variants by default."""
    rng = np.random.default_rng(seed)
    hd = hidden_size // num_heads
    wbytes = kvbytes = 2  # bf16
    tokens = batch_size * (prefill_len + decode_len)
    avg_ctx = prefill_len + decode_len / 2

    def cost(params: float, kv_heads: int, attn_flops_per_tok_ctx: float) -> dict:
        kv = 2 * kv_heads * hd * tokens * kvbytes
        w = params * wbytes
        prefill_flops = 2 * params * batch_size * prefill_len + attn_flops_per_tok_ctx * batch_size * prefill_len**2
        decode_bytes = w + 2 * kv_heads * hd * batch_size * avg_ctx * kvbytes
        decode_flops = 2 * params * batch_size + attn_flops_per_tok_ctx * batch_size * avg_ctx * 2
        return {"params": int(params), "weight_bytes": int(w), "kv_cache_bytes": int(kv),
                "prefill_time_s": prefill_flops / _FLOPS + w / _BW,
                "decode_time_s": max(decode_bytes / _BW, decode_flops / _FLOPS) + 5e-6}

    attn = {}
    for k in kv_options:
        p = 2 * hidden_size * num_heads * hd + 2 * hidden_size * k * hd
        attn[f"attn_kv{k}"] = (cost(p, k, 2 * num_heads * hd), 1.0 - k / max(kv_options))
    attn["attn_linear"] = (cost(hidden_size**2, 0, 0.0), 1.3)
    attn["attn_no_op"] = (cost(0, 0, 0.0), 1.6)
    ffn = {}
    for f in ffn_fractions:
        m = int(round(intermediate_size * f / 256)) * 256
        ffn[f"ffn_{m}"] = (cost(3 * hidden_size * m, 0, 0.0), (1.0 - f) ** 1.5 * 1.2)
    ffn["ffn_linear"] = (cost(hidden_size**2, 0, 0.0), 1.4)
    ffn["ffn_no_op"] = (cost(0, 0, 0.0), 1.7)

    # Early and last layers matter more; every layer gets its own noise.
    depth = np.linspace(0, 1, num_layers)
    sens = 0.02 * (1 + 3 * np.exp(-depth * 8) + 2 * np.exp((depth - 1) * 10)) * rng.lognormal(0, 0.5, num_layers)
    score_layers, cost_layers = [], []
    for l in range(num_layers):
        s = {}
        c = {}
        for name, (cst, sev) in {**attn, **ffn}.items():
            c[name] = cst
            kl = float(sens[l] * sev * rng.lognormal(0, 0.3)) if sev > 0 else 0.0
            s[name] = {"kl_div": kl, "lm_loss": 2.0 + kl, "top1_agreement": float(np.exp(-3 * kl))}
        if coupled:
            pairs = {}
            for a in attn:
                for f in ffn:
                    kl = (s[a]["kl_div"] + s[f]["kl_div"]) * float(rng.lognormal(0, 0.1))
                    pairs[f"{a}+{f}"] = {"kl_div": kl, "lm_loss": 2.0 + kl, "top1_agreement": float(np.exp(-3 * kl))}
            s = pairs
        score_layers.append(s)
        cost_layers.append(c)
    embed = vocab_size * hidden_size * 2
    non_block = {"params": embed, "weight_bytes": embed * wbytes, "kv_cache_bytes": 0,
                 "prefill_time_s": 2 * embed / 2 * batch_size * prefill_len / _FLOPS,
                 "decode_time_s": embed * wbytes / 2 / _BW}
    scores = {"metrics": ["kl_div", "lm_loss", "top1_agreement"],
              "parent": {"kl_div": 0.0, "lm_loss": 2.0, "top1_agreement": 1.0}, "tokens": 0, "layers": score_layers}
    costs = {"scenario": {"name": f"synthetic-b{batch_size}", "batch_size": batch_size, "prefill_len": prefill_len,
                          "decode_len": decode_len, "weight_dtype": "bfloat16", "kv_dtype": "bfloat16",
                          "device": "h100-sxm"},
             "source": "analytic", "device": {"name": "synthetic roofline"},
             "non_block": non_block, "layers": cost_layers}
    return scores, costs
