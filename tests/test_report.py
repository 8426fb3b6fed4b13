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
    from megatron_puzzle.cost.decilm_runtime import runtime_model

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


# --------------------------------------------------------------------------- the one speed


def test_ratio_interval_covers_the_true_ratio_at_its_level():
    from megatron_puzzle.report.speed import ratio_interval

    # no noise: the exact ratio and a zero-width interval
    assert ratio_interval([2.0, 4.0, 3.0], [1.0, 2.0, 1.5]) == pytest.approx((2.0, 2.0, 2.0))
    # brute force: rounds whose load slows both models alike, plus each model's own noise; the 95% interval
    # must hold the true ratio (2.0) in about 95% of many simulated measurements
    g = np.random.default_rng(0)
    hits, trials, n = 0, 2000, 5
    for _ in range(trials):
        load = np.exp(g.normal(0, 0.3, n))
        ref = 2.0 * load * np.exp(g.normal(0, 0.04, n))
        model = 1.0 * load * np.exp(g.normal(0, 0.04, n))
        _, lo, hi = ratio_interval(list(ref), list(model), 0.95)
        hits += lo <= 2.0 <= hi
    assert 0.93 <= hits / trials <= 0.97
    with pytest.raises(ValueError, match="2 paired rounds"):
        ratio_interval([1.0], [1.0])


class _Costed(torch.nn.Module):
    """A runtime model whose every forward advances a fake clock by `cost` (and logs its name)."""

    def __init__(self, inner, name, cost, clock, calls):
        super().__init__()
        self.inner, self.name, self.cost, self.clock, self.calls = inner, name, cost, clock, calls
        self.puzzle_config = inner.puzzle_config

    def forward(self, **kw):
        self.clock[0] += self.cost  # per call, prefill or decode step alike
        self.calls.append(self.name)
        return self.inner(**kw)


def test_measure_speed_interleaves_rounds_and_times_the_real_greedy_loop():
    from megatron_puzzle.cost.scenario import Scenario
    from megatron_puzzle.report.speed import SpeedConfig, measure_speed
    from megatron_puzzle.cost.decilm_runtime import runtime_model

    cfg = tiny_parent(num_layers=2)
    clock, calls = [0.0], []
    models = {}
    for name, cost in (("child", 1.0), ("parent", 3.0), ("other", 2.0)):
        m = runtime_model(cfg)
        m.puzzle_config = cfg
        models[name] = _Costed(m, name, cost, clock, calls)
    s = Scenario("t", 2, 8, 5, "float32", "float32", "cpu")
    speed = measure_speed(models, s, SpeedConfig(warmup=1, min_rounds=3, max_rounds=6, threads=1),
                          clock=lambda: clock[0])
    assert speed.rounds == 3  # exact ratios: the interval is closed after min_rounds
    assert speed.decode_s["parent"] == [15.0] * 3 and speed.prefill_s["child"] == [1.0] * 3  # 5 steps, 1 prefill
    assert speed.ratio("child") == pytest.approx((3.0, 3.0, 3.0))
    assert speed.ratio("other", "child") == pytest.approx((0.5, 0.5, 0.5))
    summary = speed.summary("child")
    assert summary["decode_tokens_per_s"] == pytest.approx(2 * 5 / 5.0) and summary["decode_speedup_low"] == pytest.approx(3.0)
    # warm-up: each model's whole generation (1 prefill + 5 steps); then every round: the prefills in the
    # round's order (parent first, reversed every other round), and the decode steps interleaved one by one,
    # the order reversed every other step
    assert calls[:18] == ["parent"] * 6 + ["child"] * 6 + ["other"] * 6
    fwd, back = ["parent", "child", "other"], ["other", "child", "parent"]
    assert calls[18:36] == fwd + fwd + back + fwd + back + fwd
    assert calls[36:54] == back + back + fwd + back + fwd + back
    assert len(calls) == 18 + 3 * 18
    with pytest.raises(ValueError, match="reference model"):
        measure_speed({"child": models["child"]}, s)
    with pytest.raises(ValueError, match="min_rounds"):
        SpeedConfig(min_rounds=1)


class _Varying(_Costed):
    """A _Costed whose per-call cost changes with every generation (1 prefill + 5 decode steps), cycling `costs`."""

    def __init__(self, inner, name, costs, clock, calls):
        super().__init__(inner, name, costs[0], clock, calls)
        self.costs, self.n = costs, 0

    def forward(self, **kw):
        self.cost = self.costs[(self.n // 6) % len(self.costs)]
        self.n += 1
        return super().forward(**kw)


def test_measure_speed_with_a_target_runs_until_the_interval_is_decided():
    from megatron_puzzle.cost.scenario import Scenario
    from megatron_puzzle.report.speed import SpeedConfig, measure_speed, ratio_interval
    from megatron_puzzle.cost.decilm_runtime import runtime_model

    cfg = tiny_parent(num_layers=2)
    s = Scenario("t", 2, 8, 5, "float32", "float32", "cpu")
    conf = SpeedConfig(warmup=1, min_rounds=3, max_rounds=12, halfwidth=0.9, threads=1)

    def inner():
        m = runtime_model(cfg)
        m.puzzle_config = cfg
        return m

    def run(target, child_costs):
        clock, calls = [0.0], []
        models = {"parent": _Costed(inner(), "parent", 3.0, clock, calls),
                  "child": _Varying(inner(), "child", child_costs, clock, calls)}
        return measure_speed(models, s, conf, clock=lambda: clock[0], target=target)

    # exact ratio 3.0: decided after min_rounds whether the target is below, at or above it
    for target in (2.0, 3.0, 3.5):
        assert run(target, [1.0]).rounds == 3
    # a child at 3x +-20% round to round (warm-up first): without a target the loose +-90% stop ends it at
    # min_rounds; against a target of 2.5 it runs until the interval's low end clears 2.5 (7 rounds), which the
    # intervals of the same rounds computed here independently confirm
    noisy = [1.0, 1.0, 1.25, 0.8, 1.2, 0.85, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    loose = run(None, noisy)
    assert loose.rounds == 3
    decided = run(2.5, noisy)
    n = decided.rounds
    assert 3 < n < 12
    ref, child = decided.decode_s["parent"], decided.decode_s["child"]
    assert ratio_interval(ref, child)[1] >= 2.5 > ratio_interval(ref[:n - 1], child[:n - 1])[1]
    # a target no interval of these rounds can decide: all 12 rounds
    assert run(3.0, [1.0, 1.1, 0.9]).rounds == 12


def test_repetition_counts_repeated_3grams():
    from megatron_puzzle.report.generations import repeated_ngrams, repetition

    # "the capital of the city of the capital of the city of" (12 words): 10 3-grams, the last 4 seen before
    loop = "the capital of the city of the capital of the city of".split()
    assert repeated_ngrams(loop) == (4, 10)
    assert repeated_ngrams(list(range(10))) == (0, 8)
    assert repetition([[1, 1, 1, 1, 1], [1, 2]]) == pytest.approx(2 / 3)  # a short one has no 3-grams
    assert math.isnan(repetition([[1, 2]]))
    g = np.random.default_rng(1)  # against a brute force: n-grams minus distinct n-grams
    for _ in range(50):
        ids = list(g.integers(0, 3, 12))
        grams = [tuple(ids[i:i + 3]) for i in range(10)]
        assert repeated_ngrams(ids) == (len(grams) - len(set(grams)), len(grams))


def test_unmatched_baseline_is_flagged_in_the_table():
    from megatron_puzzle.report.make import assemble_report, render_markdown

    def sec(tps, acc):
        return {"decode_tokens_per_s": tps, "prefill_tokens_per_s": 100.0, "next_token_accuracy": acc,
                "kl_to_parent": 1 - acc, "lm_loss": 3.0, "top1_agreement": acc, "params": 1e6,
                "memory_bytes": 2**20, "repeated_3grams": 0.25}
    sections = {"parent": sec(10.0, 0.4), "child": dict(sec(20.0, 0.3), decode_speedup=2.0, decode_speedup_low=1.9,
                                                         decode_speedup_high=2.1),
                "baseline_depth": dict(sec(25.0, 0.35), decode_ratio_to_child=1.24),
                "baseline_width": dict(sec(20.4, 0.2), decode_ratio_to_child=1.02)}
    sc = {"name": "t", "batch_size": 1, "prefill_len": 1, "decode_len": 1, "weight_dtype": "float32", "device": "cpu"}
    rep = assemble_report(sections, {}, sc, ReportConfig(), [], None,
                          {"rounds": 5, "threads": 2, "level": 0.95}, tolerance=0.05)
    assert not rep["baseline_depth"]["matched"] and rep["baseline_width"]["matched"]
    md = render_markdown(rep)
    assert "| 1.24x **unmatched** |" in md and "| 1.02x |" in md and "2.00x [1.90, 2.10]" in md
    assert "| 25% |" in md and any("baseline_depth is UNMATCHED" in n for n in rep["notes"])


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
    # speedups: geometric means of the per-round ratios in report.json, inside their intervals
    t = on_disk["timing"]
    per_round = [pa / ch for pa, ch in zip(t["decode_s"]["parent"], t["decode_s"]["child"])]
    assert t["rounds"] == len(per_round) >= 2
    assert c["decode_speedup"] == pytest.approx(math.exp(np.mean(np.log(per_round))))
    assert c["decode_speedup_low"] <= c["decode_speedup"] <= c["decode_speedup_high"]
    w_ratio = [ch / b for ch, b in zip(t["decode_s"]["child"], t["decode_s"]["baseline_width"])]
    assert on_disk["baseline_width"]["decode_ratio_to_child"] == pytest.approx(math.exp(np.mean(np.log(w_ratio))))
    for name in ("parent", "child", "baseline_width"):
        assert 0 <= on_disk[name]["repeated_3grams"] <= 1
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
