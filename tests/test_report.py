"""Report stage: baseline architectures (homogeneous width, ShortGPT depth against a hand computation and
against hooks on the DeciLM runtime), throughput matching with a fake timer, and a whole report on a tiny
run directory (report.json keys, report.md contents, resumable baselines)."""

import json
import math

import numpy as np
import pytest
import torch

from _models import tiny_parent
from _runs import make_tiny_run

from megatron_puzzle.arch import AttentionVariant as A
from megatron_puzzle.report import baselines as bl
from megatron_puzzle.report.config import BaselinesConfig, ReportConfig, load_report_config


# --------------------------------------------------------------------------- depth: Block Influence


def test_block_influence_matches_hand_computation():
    # layer 0 keeps every token's direction, layer 1 turns it by 90 degrees, layer 2 by 45 degrees
    x = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])  # [seq 2, batch 1, hidden 2]
    outs = [x * 3.0, torch.stack([torch.tensor([[0.0, 1.0]]), torch.tensor([[-5.0, 0.0]])]),
            torch.stack([torch.tensor([[1.0, 1.0]]), torch.tensor([[-1.0, 1.0]])])]
    bi = bl.block_influence([x, x, x], outs)
    hand = [0.0, 1.0, 1.0 - math.cos(math.pi / 4)]
    assert bi == pytest.approx(hand, abs=1e-12)
    # least influence dropped first: layer 0, then layer 2
    assert bl.depth_order(bi)[:2] == [0, 2]
    cfg = tiny_parent(num_layers=3)
    blocks = bl.depth_blocks(cfg, [0, 2])
    assert [b.name for b in blocks] == ["attn_no_op+ffn_no_op", cfg.parent_block().name, "attn_no_op+ffn_no_op"]
    archs = bl.depth_architectures(cfg, bi)
    assert [a[2] for a in archs] == [[], [0], [0, 2]]


def test_parent_block_influence_matches_decilm_hooks(mcore):
    from megatron_puzzle.arch.shapes import random_canonical
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.model.gpt import build_model
    from megatron_puzzle.report.throughput import runtime_model

    cfg = tiny_parent(num_layers=4)
    w = random_canonical(cfg, seed=3, std=0.2)
    model = build_model(cfg)
    load_canonical(model, w)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    got = bl.parent_block_influence(model, [tokens])

    hf = runtime_model(cfg, w)  # an independent implementation: the DeciLM runtime, read through hooks
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append((i[0], o))) for layer in hf.model.layers]
    with torch.no_grad():
        hf(input_ids=tokens, use_cache=False)
    for h in hooks:
        h.remove()
    ref = []
    for x, y in seen:
        x, y = x.double(), y.double()
        ref.append(float(1 - ((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))).mean()))
    assert got == pytest.approx(ref, abs=1e-5)


# --------------------------------------------------------------------------- width


def test_width_architectures_are_homogeneous_and_on_the_grid():
    cfg = tiny_parent(num_layers=3)  # 2 KV heads, FFN 96
    space = [["attn_kv2", "attn_kv1", "attn_no_op", "ffn_96", "ffn_48", "ffn_linear"]] * 2 + \
            [["attn_kv2", "attn_linear", "ffn_96", "ffn_48"]]  # attn_kv1 is not offered in every layer
    archs = bl.width_architectures(cfg, space, round_to=16, interpolate=True)
    for key, blocks, from_lib in archs:
        assert len(set(blocks)) == 1 and len(blocks) == 3
        b = blocks[0]
        assert b.attention == A("full", 2)
        m = b.ffn.intermediate_size
        assert from_lib == (m in (96, 48))
        assert m % 16 == 0 and 48 <= m <= 96
    assert sorted(b[0].ffn.intermediate_size for _, b, _ in archs) == [48, 64, 80, 96]
    assert len(bl.width_architectures(cfg, space, round_to=16, interpolate=False)) == 2
    with pytest.raises(ValueError, match="every layer"):
        bl.width_architectures(cfg, [["attn_no_op", "ffn_96"]] * 3)


# --------------------------------------------------------------------------- matching with a fake timer


def _cands(preds):
    return [bl.Candidate(f"c{i}", [], p) for i, p in enumerate(preds)]


def test_match_finds_a_candidate_within_tolerance_with_few_measurements():
    preds = list(np.linspace(0.5, 2.0, 31))
    truth = lambda c: 0.8 * c.predicted  # noqa: E731  the predictor is 25% optimistic, uniformly
    timed = []
    m = bl.match_throughput(_cands(preds), lambda c: timed.append(c.key) or truth(c), tolerance=0.05,
                            max_measurements=6)
    assert m.within and abs(m.ratio - 1) <= 0.05 and m.ratio == pytest.approx(truth(m.candidate))
    assert len(timed) == 2  # one miss teaches the scale, the next lands
    assert [k for k, _ in m.history] == timed


def test_match_reports_the_closest_when_nothing_is_within_tolerance():
    preds = [0.5, 0.8, 1.3, 1.6]  # the measured ratios jump over 1 +- 5%
    m = bl.match_throughput(_cands(preds), lambda c: c.predicted, tolerance=0.05, max_measurements=6)
    assert not m.within and m.candidate.key == "c1" and m.ratio == 0.8
    assert {k for k, _ in m.history} == {"c1", "c2"}  # stops once 1 is bracketed
    with pytest.raises(ValueError, match="no candidate"):
        bl.match_throughput([], lambda c: 1.0)


def test_config_defaults_quick_and_errors(tmp_path):
    r, b, _ = load_report_config(tmp_path)
    assert r == ReportConfig() and b == BaselinesConfig()
    r, b, _ = load_report_config(tmp_path, {"report": {"quick": True, "eval_tokens": 2048}})
    assert r.eval_tokens == 2048 and r.throughput_repeats == 3 and b.max_measurements == 3
    with pytest.raises(ValueError, match="unknown report option"):
        ReportConfig.from_dict({"eval_tokenz": 1})
    with pytest.raises(ValueError, match="unknown baseline"):
        ReportConfig.from_dict({"baselines": ["width", "lora"]})


# --------------------------------------------------------------------------- a whole report


def test_report_on_a_tiny_run(tmp_path, mcore):
    from megatron_puzzle.report import make_report

    run = tmp_path / "run"
    make_tiny_run(run)
    config = {
        "gkd": {"steps": 2, "batch_size": 2, "seq_len": 32, "warmup": 1, "save_interval": 0, "eval_tokens": 0,
                "progress": False},
        "report": {"eval_tokens": 512, "eval_seq_len": 32, "eval_batch_size": 4, "gen_tokens": 4,
                   "throughput_repeats": 2, "prompts": ["hi there", "abc"], "progress": False,
                   "threads": 1},
        "baselines": {"max_measurements": 2, "repeats": 1, "calib_tokens": 256, "calib_seq_len": 32,
                      "random_tries": 2, "round_to": 16},
    }
    report = make_report(run, config)
    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk["goal"] == report["goal"]
    keys = {"decode_tokens_per_s", "prefill_tokens_per_s", "next_token_accuracy", "kl_to_parent", "lm_loss",
            "top1_agreement", "params", "memory_bytes"}
    for name in ("parent", "child", "baseline_width", "baseline_depth", "baseline_random"):
        assert keys <= set(on_disk[name]), name
        assert on_disk[name]["eval_tokens"] == 512
    p, c = on_disk["parent"], on_disk["child"]
    assert p["kl_to_parent"] == pytest.approx(0.0, abs=1e-6) and p["top1_agreement"] == 1.0
    assert c["decode_speedup"] == pytest.approx(c["decode_tokens_per_s"] / p["decode_tokens_per_s"])
    assert c["next_token_accuracy_retained"] == pytest.approx(c["next_token_accuracy"] / p["next_token_accuracy"])
    assert c["params"] < p["params"] and c["kv_cache_bytes"] < p["kv_cache_bytes"]
    w = on_disk["baseline_width"]
    assert len({tuple(v) for v in w["variants"]}) == 1  # homogeneous
    d = on_disk["baseline_depth"]
    dropped = d["selection"]["info"]["dropped_layers"]
    assert all((v == ["attn_no_op", "ffn_no_op"]) == (i in dropped) for i, v in enumerate(d["variants"]))
    for name in ("width", "depth", "random"):
        bdir = run / "baselines" / name
        assert (bdir / "child" / "done").exists() and (bdir / "gkd" / "done").exists()
        assert on_disk[f"baseline_{name}"]["gkd"]["steps"] == 2
    assert len(on_disk["generations"]) == 2 and set(on_disk["generations"][0]) >= {"prompt", "parent", "child"}
    for png in ("architecture.png", "comparison.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    md = (run / "report.md").read_text()
    assert "| baseline_depth |" in md and "**Goal**" in md and ("**met**" in md or "**not met**" in md)
    assert f"{c['decode_speedup']:.2f}x" in md and "![comparison](comparison.png)" in md
    assert "hi there" in md

    # a second report reuses the baselines: no new selection, realization or training
    stamps = {n: (run / "baselines" / n / "arch.json").stat().st_mtime for n in ("width", "depth", "random")}
    make_report(run, dict(config, report=dict(config["report"], gen_tokens=0)))
    assert stamps == {n: (run / "baselines" / n / "arch.json").stat().st_mtime for n in stamps}
