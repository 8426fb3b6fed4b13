"""Variant initialisation: each method against a hand-computed (numpy / float64) reference on tiny layers."""

import numpy as np
import pytest
import torch

from _models import tiny_parent
from megatron_puzzle.arch.shapes import random_canonical, variant_shapes
from megatron_puzzle.arch import variant_from_name
from megatron_puzzle.init import methods
from megatron_puzzle.init.calibration import CalibrationStats
from megatron_puzzle.init.methods import LstsqAccumulator
from megatron_puzzle.init.variants import InitConfig, init_variant


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_mean_pool_kv_matches_manual_group_averages():
    d, hidden, heads = 3, 5, 8
    k, v = torch.randn(4 * d, hidden, generator=_g(1)), torch.randn(4 * d, hidden, generator=_g(2))
    for new_kv in (4, 2, 1):
        pk, pv = methods.mean_pool_kv(k, v, heads, new_kv, d)
        K, V = k.numpy().reshape(4, d, hidden), v.numpy().reshape(4, d, hidden)
        per = 4 // new_kv  # parent KV heads per new head
        for j in range(new_kv):
            np.testing.assert_allclose(pk.numpy().reshape(new_kv, d, hidden)[j], K[j * per:(j + 1) * per].mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(pv.numpy().reshape(new_kv, d, hidden)[j], V[j * per:(j + 1) * per].mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        methods.mean_pool_kv(k, v, heads, 3, d)


def test_channel_contribution_picks_the_channels_numpy_picks():
    hidden, m, keep = 6, 12, 5
    x = torch.randn(40, hidden, generator=_g(3))
    gate, up, down = (torch.randn(*s, generator=_g(4 + i)) for i, s in enumerate([(m, hidden), (m, hidden), (hidden, m)]))
    # numpy reference, float64
    X, G, U, D = (t.double().numpy() for t in (x, gate, up, down))
    a = (X @ G.T) / (1 + np.exp(-(X @ G.T))) * (X @ U.T)
    score = np.abs(a).mean(0) * np.sqrt((D ** 2).sum(0))
    want = np.sort(np.argsort(-score, kind="stable")[:keep])

    stats = CalibrationStats(abs_act_sum=[methods.ffn_activations(x, gate, up).abs().sum(0).double()], tokens=40)
    idx = methods.top_channels(methods.channel_contribution(stats.mean_abs_activation(0), down), keep)
    assert idx.tolist() == want.tolist()
    g2, u2, d2 = methods.prune_ffn(gate, up, down, idx)
    assert torch.equal(g2, gate[want]) and torch.equal(u2, up[want]) and torch.equal(d2, down[:, want])
    # truncation keeps the first channels
    gt, ut, dt = methods.truncate_ffn(gate, up, down, keep)
    assert torch.equal(gt, gate[:keep]) and torch.equal(dt, down[:, :keep])


def test_linear_attention_is_o_times_repeated_v():
    d, hidden, heads, kv = 2, 6, 4, 2
    v, o = torch.randn(kv * d, hidden, generator=_g(7)), torch.randn(hidden, heads * d, generator=_g(8))
    V, O = v.double().numpy(), o.double().numpy()
    want = np.zeros((hidden, hidden))
    for q in range(heads):  # query head q reads KV head q // (heads // kv)
        g = q // (heads // kv)
        want += O[:, q * d:(q + 1) * d] @ V[g * d:(g + 1) * d]
    np.testing.assert_allclose(methods.linear_attention_from_vo(v, o, heads, d).double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_least_squares_linear_ffn_matches_numpy_lstsq():
    x = torch.randn(200, 7, generator=_g(9))
    y = x @ torch.randn(7, 7, generator=_g(10)) + 0.1 * torch.randn(200, 7, generator=_g(11))
    want = np.linalg.lstsq(x.double().numpy(), y.double().numpy(), rcond=None)[0].T
    acc = LstsqAccumulator(7, 7)
    for chunk in range(4):  # streamed in pieces = one solve on everything
        acc.add(x[chunk * 50:(chunk + 1) * 50], y[chunk * 50:(chunk + 1) * 50])
    np.testing.assert_allclose(acc.solve(0.0).double().numpy(), want, rtol=1e-4, atol=1e-5)
    up, down = torch.randn(9, 7, generator=_g(12)), torch.randn(7, 9, generator=_g(13))
    np.testing.assert_allclose(methods.linear_ffn_up_down(up, down).numpy(), down.numpy() @ up.numpy(), rtol=1e-5, atol=1e-5)


def test_init_variant_shapes_methods_and_random_ablation():
    cfg = tiny_parent(num_layers=2)
    parent = random_canonical(cfg, seed=0)
    x = torch.randn(64, cfg.hidden_size, generator=_g(14))
    stats = CalibrationStats(abs_act_sum=[torch.rand(cfg.intermediate_size, dtype=torch.float64)] * 2, tokens=1,
                             lstsq=[LstsqAccumulator(64, 64) for _ in range(2)])
    for acc in stats.lstsq:
        acc.add(x, x @ torch.randn(64, 64, generator=_g(15)))
    init = InitConfig()
    expected = {"attn_kv2": "parent", "attn_kv1": "mean_pool", "attn_linear": "vo", "attn_no_op": "no_op",
                "ffn_96": "parent", "ffn_64": "channel_contribution", "ffn_linear": "lstsq", "ffn_no_op": "no_op"}
    for name, method in expected.items():
        t, m = init_variant(cfg, parent, 1, name, init, stats, seed=0)
        assert m == method
        assert {k: tuple(v.shape) for k, v in t.items()} == variant_shapes(cfg, 1, variant_from_name(name))
        if method == "parent":
            assert all(torch.equal(v, parent[k]) for k, v in t.items())
    # random ablation: only the reshaped tensors are random, reproducibly per (seed, layer, name)
    rnd = init.random_everywhere()
    a, m = init_variant(cfg, parent, 1, "attn_kv1", rnd, None, seed=5)
    b, _ = init_variant(cfg, parent, 1, "attn_kv1", rnd, None, seed=5)
    c, _ = init_variant(cfg, parent, 0, "attn_kv1", rnd, None, seed=5)
    assert m == "random" and all(torch.equal(a[k], b[k]) for k in a)
    p = "model.layers.1.self_attn."
    assert torch.equal(a[p + "q_proj.weight"], parent[p + "q_proj.weight"])
    assert not torch.equal(a[p + "k_proj.weight"], c["model.layers.0.self_attn.k_proj.weight"])
    assert abs(a[p + "k_proj.weight"].std().item() - 0.02) < 0.005
    with pytest.raises(ValueError, match="ffn_prune"):
        InitConfig(ffn_prune="magnitude")


def test_calibration_matches_a_float64_host_reference(mcore):
    """Calibration (layer by layer, on the model's device, channels from the layer's own fc1) equals
    sums computed in float64 from every layer's states and the canonical tensors, with a hand RMSNorm."""
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.model.activations import parent_activations
    from megatron_puzzle.init.calibration import collect_calibration
    from megatron_puzzle.model.gpt import build_model

    cfg = tiny_parent(num_layers=3)
    tensors = random_canonical(cfg, seed=3, std=0.1)
    model = build_model(cfg)
    load_canonical(model, tensors)
    model.eval()
    batches = [torch.randint(0, cfg.vocab_size, (2, 12), generator=_g(s)) for s in (1, 2)]
    stats = collect_calibration(model, None, batches, progress=False)
    assert stats.tokens == 48
    with torch.no_grad():
        acts = [parent_activations(model, b) for b in batches]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        abs_sum = torch.zeros(cfg.intermediate_size, dtype=torch.float64)
        xtx = torch.zeros(cfg.hidden_size, cfg.hidden_size, dtype=torch.float64)
        xty = torch.zeros_like(xtx)
        for a in acts:
            m = a.h_mid[i].reshape(-1, cfg.hidden_size).double()
            x = m / (m.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps).sqrt() * tensors[p + "post_attention_layernorm.weight"].double()
            act = torch.nn.functional.silu(x @ tensors[p + "mlp.gate_proj.weight"].double().T) * (x @ tensors[p + "mlp.up_proj.weight"].double().T)
            abs_sum += act.abs().sum(0)
            y = (a.h_in[i + 1]).reshape(-1, cfg.hidden_size).double() - m
            xtx += x.T @ x
            xty += x.T @ y
        assert torch.allclose(stats.abs_act_sum[i], abs_sum, rtol=1e-4, atol=1e-6), i
        assert torch.allclose(stats.lstsq[i].xtx, xtx, rtol=1e-4, atol=1e-6), i
        assert torch.allclose(stats.lstsq[i].xty, xty, rtol=1e-4, atol=1e-6), i
        assert stats.lstsq[i].xtx.device.type == "cpu" and stats.lstsq[i].count == 48
