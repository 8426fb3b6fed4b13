"""Energy in the search: constraints on and minimisation of joules per request / per token, against brute force.

Instances are those of test_search.py with measured-style energy added to every cost; the reference
sums the raw dicts over every architecture.
"""

from __future__ import annotations

import numpy as np
import pytest

from megatron_puzzle.search import SearchError, parse_constraint, problem_from_dicts, solve
from megatron_puzzle.search.constraints import fmt
from test_search import all_archs, arch_of, make_instance, midpoint, raw_totals


def energy_instance(seed, layers=4, coupled=False):
    scores, costs, attn, ffn = make_instance(seed, layers, 3 if not coupled else 2, 2, coupled)
    rng = np.random.default_rng(1000 + seed)
    for layer in costs["layers"]:
        for c in layer.values():
            # energy loosely follows time (as on a GPU) with its own noise, so it ranks architectures differently
            c["prefill_energy_j"] = c["prefill_time_s"] * float(rng.uniform(200, 700))
            c["decode_energy_j"] = c["decode_time_s"] * float(rng.uniform(200, 700))
    costs["non_block"].update(prefill_energy_j=0.3, decode_energy_j=0.05)
    return scores, costs, attn, ffn


def energy_totals(costs, arch):
    t = dict(costs["non_block"])
    for layer, names in enumerate(arch):
        for n in names:
            for k in ("prefill_energy_j", "decode_energy_j"):
                t[k] += costs["layers"][layer][n][k]
    sc = costs["scenario"]
    energy = t["prefill_energy_j"] + sc["decode_len"] * t["decode_energy_j"]
    return {"energy": energy, "energy_per_token": energy / (sc["batch_size"] * sc["decode_len"])}


def test_energy_units_and_format():
    c = parse_constraint("energy_per_token<=30mJ")
    assert (c.quantity, c.upper.value) == ("energy_per_token", pytest.approx(0.03))
    assert parse_constraint("energy<=0.8x").upper.relative
    assert parse_constraint("joules<=2kJ").upper.value == 2000.0
    assert fmt("energy", 0.0123) == "12.3 mJ" and fmt("energy_per_token", 2.5) == "2.5 J"


@pytest.mark.parametrize("mode", ["decoupled", "pairs"])
@pytest.mark.parametrize("quantity, relative", [("energy", False), ("energy", True), ("energy_per_token", False)])
def test_energy_constraint_optimal_against_brute_force(mode, quantity, relative):
    for seed in range(2):
        scores, costs, attn, ffn = energy_instance(seed)
        archs = all_archs(attn, ffn, 4)
        values = [energy_totals(costs, a)[quantity] for a in archs]
        bound = midpoint(values, 0.35)
        parent = energy_totals(costs, [(attn[0], ffn[0])] * 4)[quantity]
        text = f"{quantity}<={bound / parent!r}x" if relative else f"{quantity}<={bound!r}"
        sol = solve(problem_from_dicts(scores, costs, mode=mode), [text], "kl_div")[0]
        feasible = [(raw_totals(scores, costs, a)["kl_div"], a) for a, v in zip(archs, values) if v <= bound * (1 + 1e-9)]
        ref = min(k for k, _ in feasible)
        assert sol.objective == pytest.approx(ref, rel=1e-9, abs=1e-12)
        got = energy_totals(costs, arch_of(sol))
        assert got[quantity] <= bound * (1 + 1e-9)
        assert sol.totals["energy_j"] == pytest.approx(got["energy"])
        assert sol.totals["energy_per_token"] == pytest.approx(got["energy_per_token"])


def test_minimise_energy_under_a_quality_bound_against_brute_force():
    scores, costs, attn, ffn = energy_instance(5)
    archs = all_archs(attn, ffn, 4)
    kls = [raw_totals(scores, costs, a)["kl_div"] for a in archs]
    kl_max = midpoint(kls, 0.5)
    sol = solve(problem_from_dicts(scores, costs), [f"kl_div<={kl_max!r}"], "energy")[0]
    ref = min(energy_totals(costs, a)["energy"] for a, k in zip(archs, kls) if k <= kl_max * (1 + 1e-9))
    assert sol.objective == pytest.approx(ref, rel=1e-9)
    assert sol.objective_name == "energy"


def test_energy_without_measured_energy_says_how_to_get_it():
    scores, costs, _, _ = make_instance(0)
    with pytest.raises(SearchError, match="needs costs with energy.*measure on a GPU"):
        solve(problem_from_dicts(scores, costs), ["energy_per_token<=1J"], "kl_div")
