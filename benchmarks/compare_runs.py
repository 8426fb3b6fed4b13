"""Several finished runs side by side: the spread of what the README promises.

    python benchmarks/compare_runs.py runs/a runs/b runs/c [--json OUT.json] [--png OUT.png]

Each RUN is a finished run directory (RUN/report.json, RUN/timings.json, RUN/child/aim.json).
Prints one markdown row per run (wall time, the child's decode speedup with its 95% interval,
its share of the parent's next-token accuracy, KL, repeated 3-grams, and every baseline's
accuracy and speed relative to the child), then the spread of the child's figures over the
runs: min, max, and the largest deviation from their mean in percent. `--png` draws the
child and the baselines of every run in the (decode speedup, accuracy kept) plane.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BASELINES = ("baseline_width", "baseline_depth", "baseline_random")


def run_row(run: Path) -> dict:
    """The figures of one finished run, from its report, timings and aim history."""
    path = run / "report.json"
    if not path.is_file():
        raise SystemExit(f"{run}: no report.json; finish the run first (megatron-puzzle run --run-dir {run})")
    rep = json.loads(path.read_text())
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").is_file() else {}
    aim = run / "child" / "aim.json"
    tries = len(json.loads(aim.read_text())["tries"]) if aim.is_file() else None
    c = rep["child"]
    row = {"run": str(run), "minutes": sum(timings.values()) / 60 if timings else None,
           "stage_s": timings, "realize_tries": tries,
           "decode_speedup": c["decode_speedup"], "low": c.get("decode_speedup_low"),
           "high": c.get("decode_speedup_high"), "accuracy_retained": c["next_token_accuracy_retained"],
           "kl": c["kl_to_parent"], "repeated_3grams": c.get("repeated_3grams"),
           "parent_decode_tokens_per_s": rep["parent"]["decode_tokens_per_s"],
           "child_decode_tokens_per_s": c["decode_tokens_per_s"], "goal_met": rep["goal"]["met"], "baselines": {}}
    for b in BASELINES:
        if b in rep:
            s = rep[b]
            row["baselines"][b] = {"decode_speedup": s["decode_speedup"],
                                   "ratio_to_child": s.get("decode_ratio_to_child"), "matched": s.get("matched"),
                                   "accuracy_retained": s["next_token_accuracy_retained"], "kl": s["kl_to_parent"]}
    return row


def spread(values: list[float]) -> dict:
    """min, max, mean and the largest deviation from the mean in percent of it."""
    mean = sum(values) / len(values)
    return {"min": min(values), "max": max(values), "mean": mean,
            "max_dev_pct": 100 * max(abs(v - mean) for v in values) / mean}


def table(rows: list[dict]) -> str:
    head = ("| run | minutes | realize tries | child decode speedup [95%] | accuracy kept | KL | repeated 3-grams "
            "| width: acc kept (speed vs child) | depth | random |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        bl = []
        for b in BASELINES:
            s = r["baselines"].get(b)
            if s is None:
                bl.append("-")
                continue
            mark = "" if s["matched"] in (True, None) else ", unmatched"
            ratio = f"{s['ratio_to_child']:.2f}x" if s["ratio_to_child"] is not None else "?"
            bl.append(f"{100 * s['accuracy_retained']:.1f}% ({ratio}{mark})")
        minutes = f"{r['minutes']:.1f}" if r["minutes"] is not None else "?"
        interval = f" [{r['low']:.2f}, {r['high']:.2f}]" if r["low"] is not None else ""
        rep3 = f"{100 * r['repeated_3grams']:.0f}%" if r["repeated_3grams"] is not None else "?"
        out.append(f"| {Path(r['run']).name} | {minutes} | {r['realize_tries'] or '?'} | "
                   f"{r['decode_speedup']:.2f}x{interval} | {100 * r['accuracy_retained']:.1f}% | {r['kl']:.3f} | "
                   f"{rep3} | " + " | ".join(bl) + " |")
    return "\n".join(out)


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = {"child": ("o", "C0"), "baseline_width": ("s", "C1"), "baseline_depth": ("^", "C2"),
              "baseline_random": ("D", "C3")}
    for i, r in enumerate(rows):
        pts = {"child": (r["decode_speedup"], r["accuracy_retained"])}
        pts.update({b: (s["decode_speedup"], s["accuracy_retained"]) for b, s in r["baselines"].items()})
        for name, (x, y) in pts.items():
            m, col = styles[name]
            ax.scatter([x], [100 * y], marker=m, color=col, label=name.replace("baseline_", "") if i == 0 else None)
        if r["low"] is not None:
            ax.plot([r["low"], r["high"]], [100 * r["accuracy_retained"]] * 2, color="C0", lw=1)
    ax.set_xlabel("decode tokens/s over the parent's (95% interval for the child)")
    ax.set_ylabel("% of the parent's next-token accuracy kept")
    ax.set_title(f"{len(rows)} runs: child and baselines")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run directories")
    ap.add_argument("--json", type=Path, help="write the rows and the spread here")
    ap.add_argument("--png", type=Path, help="draw the runs here")
    args = ap.parse_args(argv)
    rows = [run_row(r) for r in args.runs]
    print(table(rows))
    summary = {k: spread([r[k] for r in rows]) for k in ("decode_speedup", "accuracy_retained", "kl")}
    if all(r["minutes"] is not None for r in rows):
        summary["minutes"] = spread([r["minutes"] for r in rows])
    print()
    for k, s in summary.items():
        print(f"{k}: min {s['min']:.3f}, max {s['max']:.3f}, mean {s['mean']:.3f}, "
              f"largest deviation from the mean {s['max_dev_pct']:.1f}%")
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "spread": summary}, indent=1) + "\n")
    if args.png:
        plot(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
