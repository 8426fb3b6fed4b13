"""PNG plots: the quality/throughput front and the per-layer picture of an architecture.

Figures are drawn on matplotlib's Agg canvas directly, so importing this module
never changes the pyplot backend of the caller.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from ..utils.io import atomic_path
from .constraints import RATE_QUANTITIES
from .mip import Solution
from .sweeps import ParetoPoint


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def plot_pareto(
    points: Sequence[ParetoPoint],
    path: str | Path,
    *,
    parent: Solution | None = None,
    objective_name: str = "objective",
    x: str = "throughput",
) -> None:
    """Objective (y) against throughput or memory (x): MIP front, greedy and random, the parent."""
    key = {"throughput": "throughput", "memory": "memory_bytes"}.get(x, x)
    scale, unit = (2**30, "GiB") if key == "memory_bytes" else (
        1.0, "tokens/s" if key in RATE_QUANTITIES else "")
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    styles = {"optimal": ("MIP (optimal)", "o-", "C0"), "greedy": ("greedy", "s--", "C1"),
              "random": ("random feasible", "^:", "C2")}
    for method, (label, style, color) in styles.items():
        sols = [getattr(p, method) for p in points if getattr(p, method) is not None]
        sols = [s for s in sols if key in s.totals]
        if sols:
            sols.sort(key=lambda s: s.totals[key])
            ax.plot([s.totals[key] / scale for s in sols], [s.objective for s in sols], style, color=color,
                    label=label, markersize=5)
    if parent is not None and key in parent.totals:
        ax.plot([parent.totals[key] / scale], [parent.objective], "*", color="k", markersize=13, label="parent")
    ax.set_xlabel(f"{x} ({unit})" if unit else x)
    ax.set_ylabel(f"{objective_name} (sum over layers)")
    ax.set_title(f"quality vs {x}")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def _attn_height(name: str) -> float | None:
    m = re.fullmatch(r"attn_kv(\d+)", name)
    return float(m.group(1)) if m else None


def _ffn_height(name: str) -> float | None:
    m = re.fullmatch(r"ffn_(\d+)", name)
    return float(m.group(1)) if m else None


def plot_architecture(
    solution: Solution | Sequence[Sequence[str]],
    path: str | Path,
    *,
    title: str | None = None,
) -> None:
    """Per layer: KV heads (top) and FFN size (bottom) as bars; linear and no-op marked.

    Opaque block names (library-stats layout) are drawn as one row of coloured cells.
    """
    variants = solution.variants if isinstance(solution, Solution) else [list(v) for v in solution]
    if title is None and isinstance(solution, Solution):
        title = f"{solution.objective_name.removeprefix('metrics.')} = {solution.objective:.4g}"
        if "throughput_vs_parent" in solution.totals:
            title += f", throughput {solution.totals['throughput_vs_parent']:.2f}x"
        if "memory_bytes_vs_parent" in solution.totals:
            title += f", memory {solution.totals['memory_bytes_vs_parent']:.2f}x"
    if all(len(v) == 2 and v[0].startswith("attn_") and v[1].startswith("ffn_") for v in variants):
        _plot_bars(variants, path, title)
    else:
        _plot_cells([" | ".join(v) for v in variants], path, title)


def _plot_bars(variants, path, title) -> None:
    n = len(variants)
    fig = _figure(max(6.0, 0.12 * n + 2), 4.6)
    axes = fig.subplots(2, 1, sharex=True)
    for ax, col, height_of, label, color in (
        (axes[0], 0, _attn_height, "KV heads", "C0"),
        (axes[1], 1, _ffn_height, "FFN size", "C1"),
    ):
        names = [v[col] for v in variants]
        heights = [height_of(nm) for nm in names]
        top = max([h for h in heights if h is not None], default=1.0)
        full = [(i, h) for i, h in enumerate(heights) if h is not None]
        if full:
            ax.bar([i for i, _ in full], [h for _, h in full], color=color, width=0.85, label="full")
        lin = [i for i, nm in enumerate(names) if nm.endswith("_linear")]
        if lin:
            ax.bar(lin, [top * 0.3] * len(lin), color="none", edgecolor="C3", hatch="///", width=0.85,
                   label="linear")
        noop = [i for i, nm in enumerate(names) if nm.endswith("_no_op")]
        if noop:
            ax.plot(noop, [0] * len(noop), "x", color="k", markersize=6, label="no-op")
        ax.set_ylabel(label)
        ax.set_ylim(0, top * 1.15)
        ax.legend(loc="upper right", fontsize=7, ncol=3)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xlabel("layer")
    if title:
        axes[0].set_title(title, fontsize=9)
    _save(fig, path)


def _plot_cells(names: Sequence[str], path, title) -> None:
    from matplotlib.patches import Patch

    kinds = sorted(set(names), key=names.index)
    color = {k: f"C{i % 10}" for i, k in enumerate(kinds)}
    n = len(names)
    fig = _figure(max(6.0, 0.15 * n + 2), 1.6 + 0.22 * min(len(kinds), 12))
    ax = fig.add_subplot()
    ax.bar(range(n), [1] * n, color=[color[k] for k in names], width=1.0, edgecolor="white")
    ax.set_yticks([])
    ax.set_xlabel("layer")
    ax.set_xlim(-0.5, n - 0.5)
    ax.legend(handles=[Patch(color=color[k], label=k[:60]) for k in kinds[:12]], fontsize=6,
              loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=2, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    _save(fig, path)
