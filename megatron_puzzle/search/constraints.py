"""Constraint strings (``throughput>=2.0x``, ``memory<=80GiB``) and their linear rows.

A constraint bounds one total of the child from above and/or below:

    memory<=80GiB   memory<=0.5x   params<=100M   latency<=1.5s   ttft<=200ms
    throughput>=2.0x   decode_throughput>=2.0x   1.2x<=throughput<=3x   stats.memory_mib<=120000
    energy_per_token<=0.3J   energy<=0.5x   (energy: joules of one request; needs measured energy)

A value ending in ``x`` is relative to the parent's total. Throughput is not a sum
over layers, but with the batch and decode length fixed, ``throughput >= T`` is
exactly ``latency <= batch x decode_len / T`` (and ``decode_throughput >= T`` is
``decode_time_s <= batch / T``), so every constraint becomes a linear row
``lo <= sum(coef[chosen]) + const <= hi``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from .problem import Problem, SearchError

ALIASES = {
    "memory": "memory", "mem": "memory", "memory_bytes": "memory",
    "throughput": "throughput", "tps": "throughput", "tokens_per_s": "throughput",
    "decode_throughput": "decode_throughput", "decode_tps": "decode_throughput",
    "latency": "latency", "latency_s": "latency", "time": "latency",
    "ttft": "ttft", "ttft_s": "ttft", "time_to_first_token": "ttft",
    "params": "params", "num_params": "params", "parameters": "params",
    "energy": "energy", "energy_j": "energy", "joules": "energy",
    "energy_per_token": "energy_per_token", "j_per_token": "energy_per_token",
}
_BYTES = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SECONDS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "min": 60.0}
_COUNT = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_RATE = {"tok/s": 1.0, "tokens/s": 1.0, "t/s": 1.0}
_JOULES = {"j": 1.0, "mj": 1e-3, "kj": 1e3, "wh": 3600.0, "j/tok": 1.0, "mj/tok": 1e-3}
UNITS = {
    "memory": _BYTES, "weight_bytes": _BYTES, "kv_cache_bytes": _BYTES,
    "latency": _SECONDS, "ttft": _SECONDS, "prefill_time_s": _SECONDS, "decode_time_s": _SECONDS,
    "params": _COUNT, "throughput": _RATE, "decode_throughput": _RATE,
    "energy": _JOULES, "energy_per_token": _JOULES, "prefill_energy_j": _JOULES, "decode_energy_j": _JOULES,
}

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_VALUE = rf"{_NUM}\s*[A-Za-zµ/]*"
_NAME = r"[A-Za-z_][\w.]*"
_ONE = re.compile(rf"^\s*(?P<q>{_NAME})\s*(?P<op><=|>=|==|=|<|>)\s*(?P<v>{_VALUE})\s*$")
_TWO = re.compile(rf"^\s*(?P<lo>{_VALUE})\s*(?:<=|<)\s*(?P<q>{_NAME})\s*(?:<=|<)\s*(?P<hi>{_VALUE})\s*$")


# Rates (tokens/s) and the time each divides: a lower bound on a rate is an upper bound on that time.
_RATE_TIME = {"throughput": "latency", "decode_throughput": "decode_time_s"}
RATE_QUANTITIES = tuple(_RATE_TIME)


def rate_basis(problem: Problem, quantity: str) -> tuple[str, float]:
    """The time a rate divides and the tokens done in that time.

    throughput: the whole request (prefill + decode_len steps), batch x decode_len tokens.
    decode_throughput: one decode step, batch tokens (what a serving engine's steady state sees).
    """
    work = problem.batch_size * (problem.decode_len if quantity == "throughput" else 1)
    return _RATE_TIME[quantity], float(work)


@dataclass(frozen=True)
class Bound:
    value: float  # in base units (bytes, seconds, tokens/s, count), or the factor when relative
    relative: bool
    text: str


@dataclass(frozen=True)
class Constraint:
    quantity: str  # memory, throughput, latency, ttft, params, or a key of the problem
    lower: Bound | None
    upper: Bound | None
    text: str

    def __str__(self) -> str:
        return self.text


def parse_value(text: str, quantity: str) -> Bound:
    m = re.fullmatch(rf"\s*({_NUM})\s*([A-Za-zµ/]*)\s*", text)
    if not m:
        raise SearchError(f"cannot read the value {text!r}; write a number with an optional unit or 'x'")
    number, unit = float(m.group(1)), m.group(2)
    if unit.lower() == "x":
        return Bound(number, True, text.strip())
    units = UNITS.get(quantity, {})
    if not unit:
        return Bound(number, False, text.strip())
    factor = units.get(unit.lower())
    if factor is None:
        allowed = ", ".join(sorted(units)) if units else "none"
        raise SearchError(f"unknown unit {unit!r} for {quantity} in {text!r}; use x (relative to the parent) "
                          f"or one of: {allowed}")
    return Bound(number * factor, False, text.strip())


def parse_constraint(text: str) -> Constraint:
    """Parse ``quantity<=value``, ``quantity>=value``, ``quantity=value`` or ``lo<=quantity<=hi``."""
    if not isinstance(text, str):
        raise SearchError(f"a constraint must be a string like 'memory<=80GiB', got {text!r}")
    m = _TWO.match(text)
    if m:
        q = ALIASES.get(m.group("q"), m.group("q"))
        lo, hi = parse_value(m.group("lo"), q), parse_value(m.group("hi"), q)
        return Constraint(q, lo, hi, _tidy(text))
    m = _ONE.match(text)
    if not m:
        raise SearchError(
            f"malformed constraint {text!r}; write e.g. 'throughput>=2.0x', 'memory<=80GiB', "
            "'params<=100M', 'latency<=1.5s', 'ttft<=200ms' or '1.2x<=throughput<=3x'"
        )
    q = ALIASES.get(m.group("q"), m.group("q"))
    v = parse_value(m.group("v"), q)
    op = m.group("op")
    lower = v if op in (">=", ">", "=", "==") else None
    upper = v if op in ("<=", "<", "=", "==") else None
    return Constraint(q, lower, upper, _tidy(text))


def _tidy(text: str) -> str:
    return re.sub(r"\s*(<=|>=|==|<|>|=)\s*", r"\1", text.strip())


def as_constraints(items) -> list[Constraint]:
    return [c if isinstance(c, Constraint) else parse_constraint(c) for c in (items or [])]


# ---------------------------------------------------------------------- linear rows


@dataclass
class Row:
    """``lo <= coef @ x + const <= hi`` for one constraint (throughput mapped to latency)."""

    constraint: Constraint
    coef: np.ndarray
    const: float
    lo: float
    hi: float


def parent_value(problem: Problem, quantity: str, reference: dict[str, float] | None = None) -> float:
    """The parent's total of `quantity` (relative bounds multiply it); `reference` overrides it."""
    if reference and quantity in reference:
        return reference[quantity]
    if problem.parent is None:
        raise SearchError(
            f"a relative bound on {quantity} needs the parent, but some layer has no parent option "
            "(no attn_kvN / ffn_N variant); name the parent explicitly or use an absolute value"
        )
    if quantity in RATE_QUANTITIES:
        return problem.totals(problem.parent)[quantity]
    return problem.total(quantity, problem.parent)


def absolute(problem: Problem, c: Constraint, bound: Bound, reference=None) -> float:
    return bound.value * parent_value(problem, c.quantity, reference) if bound.relative else bound.value


def to_row(problem: Problem, c: Constraint, reference: dict[str, float] | None = None) -> Row:
    lo = absolute(problem, c, c.lower, reference) if c.lower else -math.inf
    hi = absolute(problem, c, c.upper, reference) if c.upper else math.inf
    if c.quantity in RATE_QUANTITIES:
        if not problem.has_timing():
            raise SearchError(f"{c.quantity} needs costs with prefill/decode times and the scenario's batch_size "
                              "and decode_len")
        time_key, work = rate_basis(problem, c.quantity)
        coef, const = problem.linear(time_key)
        # rate >= T  <=>  time <= work / T (a rate <= 0 bounds nothing)
        t_hi = work / lo if lo > 0 else math.inf
        t_lo = work / hi if 0 < hi < math.inf else (math.inf if hi <= 0 else -math.inf)
        return Row(c, coef, const, t_lo, t_hi)
    coef, const = problem.linear(c.quantity)
    return Row(c, coef, const, lo, hi)


def satisfied(problem: Problem, choice, rows: list[Row], rtol: float = 1e-9) -> bool:
    return all(violation(problem, choice, r) <= rtol for r in rows)


def violation(problem: Problem, choice, row: Row) -> float:
    """How far outside its bounds a row is, relative to the bound's size (0 when satisfied)."""
    v = float(row.coef[np.asarray(choice)].sum() + row.const)
    out = 0.0
    if v > row.hi:
        out = (v - row.hi) / max(abs(row.hi), 1e-30)
    if v < row.lo:
        out = (row.lo - v) / max(abs(row.lo), 1e-30)
    return out


# ---------------------------------------------------------------------- human-readable values


def fmt(quantity: str, value: float) -> str:
    """A value in the unit a user would write: GiB, ms, M params, tokens/s."""
    if not math.isfinite(value):
        return str(value)
    units = UNITS.get(quantity)
    if units is _BYTES:
        for u, f in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(value) >= f:
                return f"{value / f:.4g} {u}"
        return f"{value:.4g} B"
    if units is _SECONDS:
        return f"{value:.4g} s" if abs(value) >= 1 else f"{value * 1e3:.4g} ms"
    if units is _COUNT:
        for u, f in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(value) >= f:
                return f"{value / f:.4g}{u}"
        return f"{value:.4g}"
    if quantity in RATE_QUANTITIES:
        return f"{value:.4g} tokens/s"
    if units is _JOULES:
        return f"{value:.4g} J" if abs(value) >= 1 else f"{value * 1e3:.4g} mJ"
    return f"{value:.6g}"
