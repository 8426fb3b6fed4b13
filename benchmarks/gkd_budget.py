"""Quality against GKD budget: the same realized child uptrained for several budgets, each evaluated alike.

    python benchmarks/gkd_budget.py --run-dir RUN --out OUT --steps 30 100 300
    python benchmarks/gkd_budget.py --plot OUT/gkd_budget.json --png docs/gkd_budget.png

RUN is a run directory holding parent/, data/ and child/ (e.g. `megatron-puzzle run
--until realize`). Every budget trains a fresh copy of RUN/child with the run's GKD
settings (RUN/config.yaml `gkd`, overridden by the flags) in OUT/<label>/ (parent, data
and child linked from RUN), so each point is a whole run with its own cosine schedule,
not a checkpoint of a longer one. Each result is evaluated like the report evaluates
(score.evaluate on `--eval-tokens` held-out tokens, windows of `--eval-seq-len`) and
appended to OUT/gkd_budget.json with the GKD wall time; finished labels are skipped, so
a killed sweep resumes. The plot shows the share of the parent's next-token accuracy
kept and the KL to the parent against GKD tokens, each point labelled with its wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_eval_options, loss_weights, run_gkd_settings, setup_process  # a sibling of this script

log = logging.getLogger("gkd_budget")


def _link_run(run: Path, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    for name in ("parent", "data", "child"):
        if not (work / name).exists():
            (work / name).symlink_to((run / name).resolve(), target_is_directory=True)


def _evaluate(path: Path, parent, batches) -> dict:
    from megatron_puzzle.model import checkpoint
    from megatron_puzzle.score.evaluate import evaluate_model

    import torch

    model = checkpoint.load(path)
    with torch.no_grad():
        m = evaluate_model(model, parent, batches)
    return {**{k: float(m[k]) for k in ("kl_div", "lm_loss", "accuracy", "top1_agreement")},
            "eval_tokens": int(m["tokens"])}


def _save(path: Path, data: dict) -> None:
    from megatron_puzzle.utils.io import atomic_write_json

    atomic_write_json(path, data)


def sweep(args) -> dict:
    import torch

    from megatron_puzzle.distill.gkd import FINAL_DIR, STAGE_DIR, GKDConfig, run_gkd
    from megatron_puzzle.model import checkpoint
    from megatron_puzzle.model.parallel import init_distributed
    from megatron_puzzle.score.stage import heldout_batches

    run, out = Path(args.run_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gkd_budget.json"
    data = json.loads(path.read_text()) if path.exists() else {"points": []}
    done = {p["label"] for p in data["points"]}
    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed(1)
    parent = checkpoint.load(run / "parent")
    parent.eval()
    batches = heldout_batches(run / "data", args.eval_tokens, args.eval_seq_len, args.eval_batch_size)
    if "parent" not in data:
        with torch.no_grad():
            from megatron_puzzle.score.evaluate import evaluate_model

            m = evaluate_model(parent, parent, batches)
        data["parent"] = {**{k: float(m[k]) for k in ("kl_div", "lm_loss", "accuracy", "top1_agreement")},
                          "eval_tokens": int(m["tokens"])}
        data["eval"] = {"tokens": args.eval_tokens, "seq_len": args.eval_seq_len, "batch_size": args.eval_batch_size}
        data["run_dir"] = run.name
        _save(path, data)
    if "before" not in done:
        data["points"].append({"label": "before", "steps": 0, "tokens": 0, "wall_s": 0.0,
                               **_evaluate(run / "child", parent, batches)})
        _save(path, data)
    run_gkd_cfg = run_gkd_settings(run)
    overrides = {k: v for k, v in (("lr", args.lr), ("min_lr", args.min_lr), ("batch_size", args.batch_size),
                                   ("seq_len", args.seq_len), ("dtype", args.dtype),
                                   ("teacher_dtype", args.teacher_dtype), ("warmup", args.warmup)) if v is not None}
    if args.loss:
        overrides["loss"] = {**(run_gkd_cfg.get("loss") or {}), **loss_weights(args.loss)}
    for steps in args.steps:
        gcfg = GKDConfig.from_dict({**run_gkd_cfg, **overrides, "steps": steps, "eval_tokens": 0, "save_interval": 0,
                                    "progress": not args.no_progress})
        label = args.label_prefix + f"steps{steps}"
        if label in done:
            continue
        work = out / label
        _link_run(run, work)
        t0 = time.perf_counter()
        res = run_gkd(work, gcfg)
        wall = time.perf_counter() - t0
        point = {"label": label, "steps": steps, "tokens": int(res.get("tokens", steps * gcfg.batch_size * gcfg.seq_len)),
                 "wall_s": wall, "lr": gcfg.lr, "min_lr": gcfg.min_lr, "batch_size": gcfg.batch_size,
                 "seq_len": gcfg.seq_len, "loss": gcfg.loss, "dtype": gcfg.dtype, "teacher_dtype": gcfg.teacher_dtype,
                 **_evaluate(work / STAGE_DIR / FINAL_DIR, parent, batches)}
        data["points"].append(point)
        _save(path, data)
        log.info("%s: %d tokens in %.0f s: accuracy %.4f (%.1f%% of the parent's), KL %.4f", label, point["tokens"],
                 wall, point["accuracy"], 100 * point["accuracy"] / data["parent"]["accuracy"], point["kl_div"])
    return data


def plot(data: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parent_acc = data["parent"]["accuracy"]
    groups: dict[str, list[dict]] = {}
    for p in data["points"]:
        key = "default settings" if p["label"] == "before" or p["label"].startswith("steps") else \
            p["label"].rsplit("steps", 1)[0].rstrip("_")
        groups.setdefault(key, []).append(p)
    before = next((p for p in data["points"] if p["label"] == "before"), None)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, pts) in enumerate(groups.items()):
        pts = sorted(([before] if before and name != "default settings" else []) + pts, key=lambda p: p["tokens"])
        x = [max(p["tokens"], 1000) for p in pts]  # "before" drawn at 1k tokens on the log axis
        ax1.plot(x, [100 * p["accuracy"] / parent_acc for p in pts], "o-", color=f"C{i}", label=name)
        ax2.plot(x, [p["kl_div"] for p in pts], "o-", color=f"C{i}", label=name)
        for p, xi in zip(pts, x):
            ax1.annotate("before" if p["label"] == "before" else f"{p['wall_s'] / 60:.1f} min",
                         (xi, 100 * p["accuracy"] / parent_acc), fontsize=7, textcoords="offset points",
                         xytext=(4, -10))
    ax1.axhline(90, color="grey", ls="--", lw=0.8)
    ax1.set_ylabel("next-token accuracy kept (% of the parent's)")
    ax2.set_ylabel("KL(parent || child), held-out")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("GKD tokens (the child before GKD drawn at 1k)")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle("one realized child: quality against GKD budget (labels: GKD wall time, shared 2-core CPU)",
                 fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", help="run directory with parent/, data/, child/")
    p.add_argument("--out", help="output directory (gkd_budget.json and one sub-directory per budget)")
    p.add_argument("--steps", type=int, nargs="+", default=[30, 100, 300], help="GKD steps of each budget")
    p.add_argument("--lr", type=float)
    p.add_argument("--min-lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--warmup", type=int, help="warmup steps")
    p.add_argument("--dtype", choices=["auto", "fastest", "float32", "bfloat16"], help="the student's compute dtype")
    p.add_argument("--teacher-dtype", choices=["auto", "fastest", "float32", "bfloat16"], help="the frozen parent's dtype")
    p.add_argument("--loss", help="loss weights, e.g. cosine=1,kl=1,lm=0.5 (unnamed terms keep the run's)")
    p.add_argument("--label-prefix", default="", help="prefix of the points' labels (e.g. lr5e-4_)")
    add_eval_options(p)
    p.add_argument("--plot", help="draw this gkd_budget.json instead of running")
    p.add_argument("--png", default="docs/gkd_budget.png")
    args = p.parse_args(argv)
    setup_process()
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.png))
        return 0
    if not args.run_dir or not args.out:
        p.error("--run-dir and --out are needed (or --plot FILE)")
    data = sweep(args)
    plot(data, Path(args.out) / "gkd_budget.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
