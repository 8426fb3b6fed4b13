"""Architecture search: the MIP against brute force over every architecture of small instances.

References are computed here from the raw scores/costs dicts (itertools.product over
all architectures, totals summed directly), not through the search package.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import sys
import types

import numpy as np
import pytest

from megatron_puzzle.search import (
    InfeasibleError,
    SearchError,
    greedy,
    parse_constraint,
    problem_from_dicts,
    problem_from_library_stats,
    random_feasible,
    solve,
)
from megatron_puzzle.search.constraints import fmt
from megatron_puzzle.search.sweeps import batch_sweep, pareto_sweep, write_pareto_csv

ATTN = ["attn_kv4", "attn_kv2", "attn_kv1", "attn_linear", "attn_no_op"]
FFN = ["ffn_64", "ffn_32", "ffn_16", "ffn_linear", "ffn_no_op"]


# ---------------------------------------------------------------------- instances and references


def make_instance(seed, layers=4, n_attn=3, n_ffn=2, coupled=False, batch=4, decode=16):
    """Random scores/costs dicts in the docs/formats.md layout; the parent is attn_kv4 / ffn_64."""
    rng = np.random.default_rng(seed)
    attn, ffn = ATTN[:n_attn], FFN[:n_ffn]
    s_layers, c_layers = [], []
    for _ in range(layers):
        c = {}
        for n in attn + ffn:
            c[n] = {"params": int(rng.integers(0, 10_000)), "weight_bytes": int(rng.integers(0, 40_000)),
                    "kv_cache_bytes": int(rng.integers(0, 20_000)) if n.startswith("attn_kv") else 0,
                    "prefill_time_s": float(rng.uniform(1e-3, 5e-3)), "decode_time_s": float(rng.uniform(1e-4, 1e-3))}
        for n in (attn[0], ffn[0]):  # the parent is the largest of everything
            for k in ("params", "weight_bytes", "kv_cache_bytes", "prefill_time_s", "decode_time_s"):
                c[n][k] = max(v[k] for name, v in c.items() if name.startswith(n[:4])) + (1e-4 if k.endswith("_s") else 1)
        names = [f"{a}+{f}" for a in attn for f in ffn] if coupled else attn + ffn
        s = {}
        for n in names:
            parent = n in (attn[0], ffn[0], f"{attn[0]}+{ffn[0]}")
            kl = 0.0 if parent else float(rng.uniform(0.0, 1.0))
            s[n] = {"kl_div": kl, "lm_loss": 2.0 + kl, "top1_agreement": 1.0 - kl / 2 + float(rng.uniform(0, 0.05))}
        s_layers.append(s)
        c_layers.append(c)
    scores = {"metrics": ["kl_div", "lm_loss", "top1_agreement"],
              "parent": {"kl_div": 0.0, "lm_loss": 2.0, "top1_agreement": 1.0}, "layers": s_layers}
    costs = {"scenario": {"name": "t", "batch_size": batch, "prefill_len": 8, "decode_len": decode},
             "non_block": {"params": 500, "weight_bytes": 2000, "kv_cache_bytes": 0, "prefill_time_s": 1e-3,
                           "decode_time_s": 2e-4},
             "layers": c_layers}
    return scores, costs, attn, ffn


def raw_totals(scores, costs, arch):
    """Totals of one architecture (a (attn, ffn) pair per layer), summed straight from the dicts."""
    t = dict(costs["non_block"])
    for layer, (a, f) in enumerate(arch):
        for n in (a, f):
            for k, v in costs["layers"][layer][n].items():
                t[k] += v
    for m in ("kl_div", "lm_loss", "top1_agreement"):
        t[m] = sum(
            scores["layers"][l][f"{a}+{f}"][m] if f"{a}+{f}" in scores["layers"][l]
            else scores["layers"][l][a][m] + scores["layers"][l][f][m]
            for l, (a, f) in enumerate(arch)
        )
    sc = costs["scenario"]
    t["memory"] = t["weight_bytes"] + t["kv_cache_bytes"]
    t["latency"] = t["prefill_time_s"] + sc["decode_len"] * t["decode_time_s"]
    t["ttft"] = t["prefill_time_s"]
    t["throughput"] = sc["batch_size"] * sc["decode_len"] / t["latency"]
    t["decode_throughput"] = sc["batch_size"] / t["decode_time_s"]
    return t


def all_archs(attn, ffn, layers):
    return list(itertools.product(list(itertools.product(attn, ffn)), repeat=layers))


def holds(t, bounds, rtol=1e-9):
    """bounds: list of (quantity, lo, hi) in absolute units."""
    return all((lo is None or t[q] >= lo * (1 - rtol)) and (hi is None or t[q] <= hi * (1 + rtol))
               for q, lo, hi in bounds)


def brute_best(scores, costs, archs, bounds, metric="kl_div", maximise=False, exclude=(), min_diff=0):
    best, best_arch = None, None
    for arch in archs:
        if any(sum(x != y for x, y in zip(arch, e)) < min_diff for e in exclude):
            continue
        t = raw_totals(scores, costs, arch)
        if not holds(t, bounds):
            continue
        v = -t[metric] if maximise else t[metric]
        if best is None or v < best:
            best, best_arch = v, arch
    return (None if best is None else (-best if maximise else best)), best_arch


def midpoint(values, q):
    """A bound halfway between two neighbouring distinct values: no architecture sits on it."""
    v = np.unique(np.round(values, 12))
    i = min(max(int(q * (len(v) - 1)), 0), len(v) - 2)
    return float((v[i] + v[i + 1]) / 2)


def arch_of(solution):
    return tuple(tuple(v) for v in solution.variants)


# constraint kind -> (quantity, sense, relative)
KINDS = {
    "memory_abs": ("memory", "<=", False),
    "memory_rel": ("memory", "<=", True),
    "throughput_rel": ("throughput", ">=", True),
    "throughput_abs": ("throughput", ">=", False),
    "decode_throughput_rel": ("decode_throughput", ">=", True),
    "decode_throughput_abs": ("decode_throughput", ">=", False),
    "latency": ("latency", "<=", False),
    "ttft": ("ttft", "<=", False),
    "params": ("params", "<=", False),
    "params_lower": ("params", ">=", False),
    "cost_key": ("kv_cache_bytes", "<=", False),
}


def constraint_for(kind, scores, costs, archs, attn, ffn, q=0.35):
    quantity, op, relative = KINDS[kind]
    values = [raw_totals(scores, costs, a)[quantity] for a in archs]
    v = midpoint(values, q if op == "<=" else 1 - q)
    bound = (quantity, v, None) if op == ">=" else (quantity, None, v)
    if relative:
        parent = raw_totals(scores, costs, [(attn[0], ffn[0])] * len(archs[0]))[quantity]
        text = f"{quantity}{op}{v / parent!r}x"
    else:
        text = f"{quantity}{op}{v!r}"
    return text, bound


# ---------------------------------------------------------------------- parsing


def test_parse_constraint_units():
    c = parse_constraint("memory<=80GiB")
    assert (c.quantity, c.upper.value, c.lower) == ("memory", 80 * 2**30, None)
    assert parse_constraint("ttft<=200ms").upper.value == pytest.approx(0.2)
    assert parse_constraint("latency <= 1.5s").upper.value == 1.5
    assert parse_constraint("params<=100M").upper.value == 1e8
    c = parse_constraint("throughput>=2.0x")
    assert c.lower.relative and c.lower.value == 2.0 and c.upper is None
    c = parse_constraint("decode_tps>=40tok/s")
    assert (c.quantity, c.lower.value, c.lower.relative) == ("decode_throughput", 40.0, False)
    c = parse_constraint("1.2x<=throughput<=3x")
    assert (c.lower.value, c.upper.value) == (1.2, 3.0)
    assert parse_constraint("stats.memory_mib<=1e5").quantity == "stats.memory_mib"
    for bad in ("memory<<80", "memory<=80 parsecs", "<=3", "throughput>=fast"):
        with pytest.raises(SearchError):
            parse_constraint(bad)


# ---------------------------------------------------------------------- optimality vs brute force


@pytest.mark.parametrize("coupled,mode", [(False, "decoupled"), (False, "pairs"), (True, "pairs")])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_optimal_against_brute_force(kind, coupled, mode):
    for seed in range(2):
        layers, n_attn, n_ffn = (4, 2, 2) if coupled else (4, 3, 2)
        scores, costs, attn, ffn = make_instance(100 * seed + len(kind), layers, n_attn, n_ffn, coupled)
        archs = all_archs(attn, ffn, layers)
        text, bound = constraint_for(kind, scores, costs, archs, attn, ffn)
        # a second, looser memory bound makes every instance a two-constraint problem
        mem = [raw_totals(scores, costs, a)["memory"] for a in archs]
        mem_text = f"memory<={midpoint(mem, 0.8)!r}"
        bounds = [bound, ("memory", None, midpoint(mem, 0.8))]
        problem = problem_from_dicts(scores, costs, mode=mode)
        sol = solve(problem, [text, mem_text], "kl_div")[0]
        ref, _ = brute_best(scores, costs, archs, bounds)
        assert ref is not None
        assert sol.objective == pytest.approx(ref, rel=1e-9, abs=1e-12)
        t = raw_totals(scores, costs, arch_of(sol))
        assert holds(t, bounds)
        assert t["kl_div"] == pytest.approx(sol.objective, rel=1e-12)
        assert sol.totals["memory_bytes"] == pytest.approx(t["memory"])
        assert sol.totals["throughput"] == pytest.approx(t["throughput"])
        assert sol.totals["decode_throughput"] == pytest.approx(t["decode_throughput"])


@pytest.mark.parametrize("coupled,mode", [(False, "decoupled"), (False, "pairs"), (True, "pairs")])
def test_attention_layers_floor_against_brute_force(coupled, mode):
    """`attention_layers>=K` (absolute, and relative to the parent's layers) against brute force with
    the count taken from the names: every attention variant but attn_no_op keeps a layer's attention."""
    layers = 4
    scores, costs, attn, ffn = make_instance(31, layers, n_attn=5, n_ffn=2, coupled=coupled)
    assert "attn_no_op" in attn and "attn_linear" in attn
    archs = all_archs(attn, ffn, layers)
    tps = [raw_totals(scores, costs, a)["decode_throughput"] for a in archs]
    fast = midpoint(tps, 0.6)  # a speed bound that wants some attention dropped
    problem = problem_from_dicts(scores, costs, mode=mode)
    unconstrained = solve(problem, [f"decode_throughput>={fast!r}"], "kl_div")[0]
    kept = lambda arch: sum(a != "attn_no_op" for a, _ in arch)
    seen = set()
    for k, text in [(1, "attention_layers>=1"), (2, "attention_layers>=0.5x"), (3, "attention_layers>=3"),
                    (4, "attention_layers>=1.0x")]:
        ok = [a for a in archs if kept(a) >= k]
        ref, _ = brute_best(scores, costs, ok, [("decode_throughput", fast, None)])
        if ref is None:
            with pytest.raises(InfeasibleError):
                solve(problem, [f"decode_throughput>={fast!r}", text], "kl_div")
            continue
        sol = solve(problem, [f"decode_throughput>={fast!r}", text], "kl_div")[0]
        assert sol.objective == pytest.approx(ref, rel=1e-9, abs=1e-12)
        assert kept(arch_of(sol)) >= k
        assert sol.totals["attention_layers"] == kept(arch_of(sol))
        seen.add(kept(arch_of(sol)))
    assert unconstrained.totals["attention_layers"] == kept(arch_of(unconstrained)) < 4  # the bound bites
    assert len(seen) >= 2


def test_attention_candidates_are_the_best_under_each_floor(tmp_path):
    """search_run_dir's attention-floor candidates: each is the brute-force best under the constraints plus its
    floor, new (not the plain solution nor an earlier floor's), and tagged with its floor in solutions.json."""
    from megatron_puzzle.arch import ModelConfig
    from megatron_puzzle.search.run import search_run_dir

    layers = 4
    scores, costs, attn, ffn = make_instance(31, layers, n_attn=5, n_ffn=2)
    for layer, (s, c) in enumerate(zip(scores["layers"], costs["layers"])):  # dropping attention: free, mild
        c["attn_no_op"] = {k: 0 for k in c["attn_no_op"]}
        s["attn_no_op"] = {"kl_div": 0.05 * (layer + 1), "lm_loss": 2.0, "top1_agreement": 0.9}
    run = tmp_path / "run"
    for d in ("score", "measure", "parent"):
        (run / d).mkdir(parents=True)
    (run / "score" / "scores.json").write_text(json.dumps(scores))
    (run / "measure" / "costs.json").write_text(json.dumps(costs))
    ModelConfig(vocab_size=100, hidden_size=48, num_layers=layers, num_attention_heads=4, num_kv_heads=4,
                intermediate_size=64).save(run / "parent" / "model_config.json")
    archs = all_archs(attn, ffn, layers)
    fast = midpoint([raw_totals(scores, costs, a)["decode_throughput"] for a in archs], 0.8)
    floors = [0.25, 0.5, 0.5, 0.75, 1.0]
    out = search_run_dir(run, [f"decode_throughput>={fast!r}"], plots=False, attention_floors=floors)
    kept = lambda arch: sum(a != "attn_no_op" for a, _ in arch)
    sols = out["solutions"]
    assert sols[0].get("attention_floor") is None and sols[0]["totals"]["attention_layers"] <= 1
    variants = [tuple(tuple(v) for v in s["variants"]) for s in sols]
    assert len(set(variants)) == len(variants)  # no candidate repeats an earlier one
    expected = []  # what each floor adds, by brute force
    for f in floors:
        ok = [a for a in archs if kept(a) >= f * layers]
        ref, arch = brute_best(scores, costs, ok, [("decode_throughput", fast, None)])
        if ref is not None and arch not in [variants[0]] + [e[1] for e in expected]:
            expected.append((f, arch, ref))
    assert [s["attention_floor"] for s in sols[1:]] == [f for f, _, _ in expected]
    for s, (f, arch, ref) in zip(sols[1:], expected):
        assert s["objective"] == pytest.approx(ref, rel=1e-9, abs=1e-12)
        assert s["totals"]["attention_layers"] == kept(tuple(tuple(v) for v in s["variants"])) >= f * layers
    assert len(expected) >= 2  # the floors change the answer on this instance
    with pytest.raises(SearchError, match="attention floors are shares"):
        search_run_dir(run, [f"decode_throughput>={fast!r}"], plots=False, attention_floors=[2])


@pytest.mark.parametrize("mode", ["decoupled", "pairs"])
def test_maximised_metric_and_range(mode):
    scores, costs, attn, ffn = make_instance(7, 4, 3, 2)
    archs = all_archs(attn, ffn, 4)
    tps = [raw_totals(scores, costs, a)["throughput"] for a in archs]
    lo, hi = midpoint(tps, 0.3), midpoint(tps, 0.7)
    problem = problem_from_dicts(scores, costs, mode=mode)
    sol = solve(problem, [f"{lo!r}<=throughput<={hi!r}"], "top1_agreement")[0]  # agreement: maximised
    ref, _ = brute_best(scores, costs, archs, [("throughput", lo, hi)], "top1_agreement", maximise=True)
    assert sol.objective == pytest.approx(ref, rel=1e-9)
    sol = solve(problem, [f"throughput>={lo!r}"], "lm_loss", sense="max")[0]
    ref, _ = brute_best(scores, costs, archs, [("throughput", lo, None)], "lm_loss", maximise=True)
    assert sol.objective == pytest.approx(ref, rel=1e-9)


def test_highs_and_scipy_agree():
    for seed in range(3):
        scores, costs, attn, ffn = make_instance(seed, 4, 3, 2)
        problem = problem_from_dicts(scores, costs)
        cons = ["throughput>=1.3x", "memory<=0.8x"]
        a = solve(problem, cons, solver="highs")[0]
        b = solve(problem, cons, solver="scipy")[0]
        assert a.objective == pytest.approx(b.objective, rel=1e-9, abs=1e-12)


def test_gurobi_matches_highs_when_installed():
    pytest.importorskip("gurobipy")
    for seed in range(3):
        scores, costs, attn, ffn = make_instance(seed, 4, 3, 2)
        problem = problem_from_dicts(scores, costs)
        cons = ["throughput>=1.3x", "memory<=0.8x"]
        a = solve(problem, cons, solver="gurobi", num_solutions=2, min_diff=1)
        b = solve(problem, cons, solver="highs", num_solutions=2, min_diff=1)
        assert [s.objective for s in a] == pytest.approx([s.objective for s in b], rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------- diversity


@pytest.mark.parametrize("coupled,mode", [(False, "decoupled"), (False, "pairs"), (True, "pairs")])
def test_diverse_solutions(coupled, mode):
    scores, costs, attn, ffn = make_instance(3, 4, 2 if coupled else 3, 2, coupled)
    archs = all_archs(attn, ffn, 4)
    tps = [raw_totals(scores, costs, a)["throughput"] for a in archs]
    t = midpoint(tps, 0.4)
    problem = problem_from_dicts(scores, costs, mode=mode)
    sols = solve(problem, [f"throughput>={t!r}"], num_solutions=4, min_diff=2)
    assert len(sols) == 4
    found = [arch_of(s) for s in sols]
    for k, arch in enumerate(found):
        for earlier in found[:k]:
            assert sum(x != y for x, y in zip(arch, earlier)) >= 2
        # each is the best architecture that differs enough from all earlier ones
        ref, _ = brute_best(scores, costs, archs, [("throughput", t, None)], exclude=found[:k], min_diff=2)
        assert sols[k].objective == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_fewer_diverse_solutions_than_asked(caplog):
    scores, costs, attn, ffn = make_instance(4, 2, 2, 2, coupled=True)
    problem = problem_from_dicts(scores, costs)
    with caplog.at_level(logging.WARNING):
        sols = solve(problem, [], num_solutions=5, min_diff=2)
    # two layers x 4 pairs: an architecture differing in both layers from all earlier ones
    # exists at most 4 times (each layer's pair can be used once)
    assert 1 <= len(sols) <= 4
    assert "no further one exists" in caplog.text


# ---------------------------------------------------------------------- infeasibility


def test_infeasible_names_constraint_and_best_value():
    scores, costs, attn, ffn = make_instance(5, 3, 3, 2)
    archs = all_archs(attn, ffn, 3)
    smallest = min(raw_totals(scores, costs, a)["memory"] for a in archs)
    problem = problem_from_dicts(scores, costs)
    with pytest.raises(InfeasibleError) as e:
        solve(problem, [f"memory<={smallest * 0.9}", "throughput>=0.5x"])
    msg = str(e.value)
    assert msg.startswith("memory <= ") and "is infeasible: the smallest child needs" in msg
    assert fmt("memory", smallest) in msg
    fastest = max(raw_totals(scores, costs, a)["throughput"] for a in archs)
    parent = raw_totals(scores, costs, [(attn[0], ffn[0])] * 3)["throughput"]
    with pytest.raises(InfeasibleError, match="throughput >= 50x .* the fastest child reaches") as e:
        solve(problem, ["throughput>=50x"])
    assert fmt("throughput", fastest) in str(e.value) and f"{fastest / parent:.3g}x the parent" in str(e.value)


def test_jointly_infeasible_message():
    scores, costs, attn, ffn = make_instance(6, 3, 3, 2)
    archs = all_archs(attn, ffn, 3)
    tots = [raw_totals(scores, costs, a) for a in archs]
    # the fewest params and the most kv cache cannot coexist at their extremes
    p_min = min(t["params"] for t in tots)
    m_max = max(t["memory"] for t in tots)
    problem = problem_from_dicts(scores, costs)
    feasible_both = [t for t in tots if t["params"] <= p_min and t["memory"] >= m_max]
    assert not feasible_both
    with pytest.raises(InfeasibleError, match="cannot all hold together"):
        solve(problem, [f"params<={p_min}", f"memory>={m_max}"])


# ---------------------------------------------------------------------- solver fallback


def _fake_gurobipy():
    mod = types.ModuleType("gurobipy")

    class GurobiError(Exception):
        def __init__(self, errno, msg):
            super().__init__(msg)
            self.errno = errno

    class GRB:
        INTEGER, CONTINUOUS, MINIMIZE = "I", "C", 1
        EQUAL, LESS_EQUAL, GREATER_EQUAL = "=", "<", ">"
        OPTIMAL, INFEASIBLE, INF_OR_UNBD = 2, 3, 4

    class _Params:
        def __setattr__(self, k, v):
            pass

    class Env:
        def __init__(self, *a, **k):
            pass

        def setParam(self, *a):
            pass

        def start(self):
            return self

    class Model:
        calls = 0

        def __init__(self, *a, **k):
            self.Params = _Params()

        def __getattr__(self, name):
            return lambda *a, **k: None

        def optimize(self):
            Model.calls += 1
            raise GurobiError(10010, "Model too large for size-limited license; visit https://www.gurobi.com/free-trial "
                                     "for a full license")

    mod.GurobiError, mod.GRB, mod.Env, mod.Model = GurobiError, GRB, Env, Model
    return mod


def test_gurobi_size_limit_falls_back_to_highs(monkeypatch, caplog):
    fake = _fake_gurobipy()
    monkeypatch.setitem(sys.modules, "gurobipy", fake)
    scores, costs, attn, ffn = make_instance(8, 4, 3, 2)
    problem = problem_from_dicts(scores, costs)
    cons = ["throughput>=1.2x", "memory<=0.9x"]
    with caplog.at_level(logging.INFO, logger="megatron_puzzle.search"):
        sols = solve(problem, cons, num_solutions=3, min_diff=1)
    ref = solve(problem, cons, num_solutions=3, min_diff=1, solver="highs")
    assert [s.objective for s in sols] == pytest.approx([s.objective for s in ref])
    assert all(s.solver == "highs" for s in sols)
    lines = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(lines) == 1 and "10010" in lines[0] and "\n" not in lines[0]
    assert fake.Model.calls == 1  # refused once, not retried for every solution
    with pytest.raises(SearchError, match="gurobi cannot run"):
        solve(problem, cons, solver="gurobi")


# ---------------------------------------------------------------------- baselines


@pytest.mark.parametrize("mode", ["decoupled", "pairs"])
def test_greedy_and_random_are_feasible(mode):
    for seed in range(3):
        scores, costs, attn, ffn = make_instance(20 + seed, 4, 3, 2)
        archs = all_archs(attn, ffn, 4)
        tps = [raw_totals(scores, costs, a)["throughput"] for a in archs]
        mem = [raw_totals(scores, costs, a)["memory"] for a in archs]
        t, m = midpoint(tps, 0.5), midpoint(mem, 0.6)
        bounds = [("throughput", t, None), ("memory", None, m)]
        problem = problem_from_dicts(scores, costs, mode=mode)
        cons = [f"throughput>={t!r}", f"memory<={m!r}"]
        opt, _ = brute_best(scores, costs, archs, bounds)
        if opt is None:
            continue
        g = greedy(problem, cons)
        r = random_feasible(problem, cons, seed=seed)
        for s in (g, r):
            tot = raw_totals(scores, costs, arch_of(s))
            assert holds(tot, bounds)
            assert s.objective == pytest.approx(tot["kl_div"])
            assert s.objective >= opt - 1e-12
        assert arch_of(random_feasible(problem, cons, seed=seed)) == arch_of(r)


# ---------------------------------------------------------------------- sweeps


def test_pareto_sweep_matches_brute_force(tmp_path):
    scores, costs, attn, ffn = make_instance(9, 3, 3, 2)
    archs = all_archs(attn, ffn, 3)
    parent = raw_totals(scores, costs, [(attn[0], ffn[0])] * 3)["throughput"]
    problem = problem_from_dicts(scores, costs)
    points = pareto_sweep(problem, "throughput:1.05x:1.6x:4", [], "kl_div")
    assert len(points) == 4
    for p in points:
        target = p.target.lower.value * parent
        ref, _ = brute_best(scores, costs, archs, [("throughput", target * (1 + 1e-9), None)])
        if ref is None:
            assert p.optimal is None and "infeasible" in p.error
            continue
        assert p.optimal.objective == pytest.approx(ref, rel=1e-9, abs=1e-12)
        for b in (p.greedy, p.random):
            if b is not None:
                assert raw_totals(scores, costs, arch_of(b))["throughput"] >= target * (1 - 1e-9)
    write_pareto_csv(points, tmp_path / "p.csv")
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0].startswith("target,method,feasible,objective") and len(rows) == 1 + 3 * 4


def test_batch_sweep_picks_best_batch():
    # the same model at three batch sizes: bigger batches are faster per token but need more KV cache
    scores, costs, attn, ffn = make_instance(11, 3, 3, 2)
    variants = []
    for b in (1, 4, 16):
        c = json.loads(json.dumps(costs))
        c["scenario"]["batch_size"] = b
        for layer in c["layers"]:
            for v in layer.values():
                v["kv_cache_bytes"] *= b
                v["decode_time_s"] *= 1 + 0.1 * b
        variants.append(c)
    archs = all_archs(attn, ffn, 3)
    mem_cap = midpoint([raw_totals(scores, variants[1], a)["memory"] for a in archs], 0.9)
    p_arch = [(attn[0], ffn[0])] * 3
    ref_tp = max(raw_totals(scores, c, p_arch)["throughput"] for c in variants
                 if raw_totals(scores, c, p_arch)["memory"] <= mem_cap)
    problems = [problem_from_dicts(scores, c) for c in variants]
    sweep = batch_sweep(problems, [f"memory<={mem_cap!r}", "throughput>=1.1x"])
    assert sweep.reference_throughput == pytest.approx(ref_tp)
    best = []
    for c in variants:
        v, _ = brute_best(scores, c, archs, [("memory", None, mem_cap), ("throughput", 1.1 * ref_tp, None)])
        best.append(math.inf if v is None else v)
    assert sweep.best is not None
    assert sweep.points[sweep.best].solutions[0].objective == pytest.approx(min(best), rel=1e-9, abs=1e-12)
    for pt, c in zip(sweep.points, variants):  # the fastest child that fits memory, per batch size
        fast = max(raw_totals(scores, c, a)["throughput"] for a in archs
                   if raw_totals(scores, c, a)["memory"] <= mem_cap)
        assert pt.max_throughput == pytest.approx(fast, rel=1e-9)


# ---------------------------------------------------------------------- library stats layout


def make_library_stats(seed, layers=3, per_layer=4):
    rng = np.random.default_rng(seed)
    data = {}
    for l in range(layers):
        entries = {}
        for k in range(per_layer):
            name = f"attention gqa_{2 ** k} ffn intermediate_{1024 // 2 ** k}"
            entries[name] = {
                "stats": {"memory_mib": float(rng.uniform(10, 100)), "runtime_ms": float(rng.uniform(1, 10)),
                          "num_params": int(rng.integers(1000, 100000)), "note": "x"},
                "metrics": {"kl_div": 0.0 if k == 0 else float(rng.uniform(0, 1)), "lm_loss": 2.0},
            }
        data[f"layer_{l}"] = entries
    return data


def test_library_stats_against_brute_force():
    data = make_library_stats(0)
    layers = [sorted(data[f"layer_{l}"]) for l in range(3)]
    total = lambda arch, part, key: sum(data[f"layer_{l}"][n][part][key] for l, n in enumerate(arch))
    archs = list(itertools.product(*layers))
    mem = midpoint([total(a, "stats", "memory_mib") for a in archs], 0.5)
    rt = midpoint([total(a, "stats", "runtime_ms") for a in archs], 0.6)
    problem = problem_from_library_stats(data)
    sol = solve(problem, [f"stats.memory_mib<={mem!r}", f"stats.runtime_ms<={rt!r}"], "metrics.kl_div")[0]
    feasible = [a for a in archs if total(a, "stats", "memory_mib") <= mem and total(a, "stats", "runtime_ms") <= rt]
    ref = min(total(a, "metrics", "kl_div") for a in feasible)
    assert sol.objective == pytest.approx(ref, rel=1e-9, abs=1e-12)
    arch = [v[0] for v in sol.variants]
    assert total(arch, "stats", "memory_mib") <= mem and total(arch, "stats", "runtime_ms") <= rt
    with pytest.raises(SearchError, match="unknown quantity"):
        solve(problem, ["stats.nonsense<=3"])


# ---------------------------------------------------------------------- CLI


@pytest.fixture
def cli_main(monkeypatch):
    import megatron_puzzle.cli as cli

    monkeypatch.setattr(cli, "COMMAND_MODULES", ["megatron_puzzle.search.cli"])
    return cli.main


def write_run(tmp_path, coupled=False):
    from megatron_puzzle.arch import ModelConfig

    scores, costs, attn, ffn = make_instance(12, 4, 3, 3, coupled)
    run = tmp_path / "run"
    (run / "score").mkdir(parents=True)
    (run / "measure").mkdir()
    (run / "parent").mkdir()
    (run / "score" / "scores.json").write_text(json.dumps(scores))
    (run / "measure" / "costs.json").write_text(json.dumps(costs))
    ModelConfig(vocab_size=100, hidden_size=48, num_layers=4, num_attention_heads=4, num_kv_heads=4,
                intermediate_size=64).save(run / "parent" / "model_config.json")
    return run, scores, costs


def test_cli_run_dir(tmp_path, cli_main):
    from megatron_puzzle.arch import blocks_from_json

    run, scores, costs = write_run(tmp_path)
    rc = cli_main(["search", "--run-dir", str(run), "--constraint", "throughput>=1.2x", "--constraint",
                   "memory<=0.9x", "--num-solutions", "2", "--min-diff", "1", "--pareto", "throughput:1.1x:1.4x:3"])
    assert rc == 0
    out = json.loads((run / "search" / "solutions.json").read_text())
    assert (run / "search" / "done").exists()
    assert out["objective"] == "kl_div" and out["constraints"] == ["throughput>=1.2x", "memory<=0.9x"]
    assert len(out["solutions"]) == 2
    for s in out["solutions"]:
        blocks = blocks_from_json(s["blocks"], num_layers=4, hidden_size=48, num_attention_heads=4,
                                  num_kv_heads=4, intermediate_size=64)
        assert [[b.attention.name, b.ffn.name] for b in blocks] == s["variants"]
        t = raw_totals(scores, costs, [tuple(v) for v in s["variants"]])
        assert s["objective"] == pytest.approx(t["kl_div"]) == pytest.approx(s["totals"]["kl_div"])
        assert s["totals"]["throughput_vs_parent"] >= 1.2 - 1e-9
        assert s["totals"]["memory_bytes"] == pytest.approx(t["memory"])
        parent = raw_totals(scores, costs, [("attn_kv4", "ffn_64")] * 4)
        assert t["memory"] <= 0.9 * parent["memory"] * (1 + 1e-9)
        assert t["throughput"] >= 1.2 * parent["throughput"] * (1 - 1e-9)
    for png in ("pareto.png", "architecture_0.png", "architecture_1.png"):
        assert (run / "search" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((run / "search" / "pareto.csv").read_text().splitlines()) == 2 + 3 * 3


def test_cli_batch_sizes(tmp_path, cli_main):
    run, scores, costs = write_run(tmp_path)
    paths = []
    for b in (2, 8):
        c = json.loads(json.dumps(costs))
        c["scenario"]["batch_size"] = b
        for layer in c["layers"]:
            for v in layer.values():
                v["kv_cache_bytes"] *= b
        paths += ["--costs", str(tmp_path / f"costs_b{b}.json")]
        (tmp_path / f"costs_b{b}.json").write_text(json.dumps(c))
    rc = cli_main(["search", "--run-dir", str(run), "--no-plots", "--hidden-size", "48", "--num-heads", "4",
                   "--constraint", "throughput>=1.1x", *paths])
    assert rc == 0
    out = json.loads((run / "search" / "solutions.json").read_text())
    assert [p["batch_size"] for p in out["batch_sweep"]] == [2, 8]
    best = min((p for p in out["batch_sweep"] if p["feasible"]), key=lambda p: p["objective"])
    assert out["scenario"]["batch_size"] == best["batch_size"]
    assert out["solutions"][0]["objective"] == pytest.approx(best["objective"])


def test_cli_library_stats(tmp_path, cli_main):
    data = make_library_stats(1)
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "sol.json"
    rc = cli_main(["search", "--library-stats", str(path), "--objective", "metrics.kl_div",
                   "--constraint", "stats.memory_mib<=150", "--constraint", "stats.runtime_ms<=20", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    sol = res["solutions"][0]
    assert sorted(sol["chosen"]) == ["layer_0", "layer_1", "layer_2"]
    mem = sum(data[l][n]["stats"]["memory_mib"] for l, n in sol["chosen"].items())
    assert sol["constrained"]["stats.memory_mib"] == pytest.approx(mem) and mem <= 150


@pytest.mark.parametrize("args,needle", [
    (["--constraint", "memory<=<=3"], "malformed constraint"),
    (["--objective", "bleu"], "unknown quantity 'bleu'"),
    (["--constraint", "memory<=1B"], "is infeasible"),
    (["--costs", "/nonexistent/costs.json"], "does not exist"),
])
def test_cli_bad_input_exits_2(tmp_path, cli_main, capsys, args, needle):
    run, _, _ = write_run(tmp_path)
    rc = cli_main(["search", "--run-dir", str(run), "--no-plots", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert needle in err and len(err.splitlines()) == 1
