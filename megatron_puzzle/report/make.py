"""The eval stage: evaluate and time parent, child and baselines; write the report.

    RUN/report.json   parent, child, baseline_width, baseline_depth, baseline_random sections
    RUN/report.md     one screen: side-by-side table, the goal line, notes, generations, plots
    RUN/architecture.png, RUN/pareto.png, RUN/comparison.png
    RUN/eval/<model>.json   cached held-out metrics (reused when the checkpoint is unchanged)
    RUN/baselines/<name>/   see `report.baselines`

The child is RUN/gkd/final when GKD has finished, else RUN/child. Throughput of every
model is measured in this one process with the same runtime, rounds interleaved, the
same way the realize stage measured the child (report/speed.py): speedups are per-round
ratios with confidence intervals, and the baselines' ratios to the child come from the
same rounds, so a baseline that drifted off the child's speed since its matching shows
as unmatched in the table.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from ..arch import ModelConfig
from ..utils.io import atomic_path, atomic_write_json, atomic_write_text, is_done, read_json
from . import baselines as bl
from .config import BaselinesConfig, ReportConfig, load_report_config
from .speed import measure_speed
from .throughput import measure_throughput, model_size

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
METRIC_KEYS = {"kl_div": "kl_to_parent", "lm_loss": "lm_loss", "accuracy": "next_token_accuracy",
               "top1_agreement": "top1_agreement"}


# --------------------------------------------------------------------------- inputs


def child_checkpoint(run: Path) -> Path:
    final = run / "gkd" / "final"
    if is_done(run / "gkd") and is_done(final):
        return final
    if is_done(run / "child"):
        return run / "child"
    raise FileNotFoundError(f"no child checkpoint in {run / 'gkd' / 'final'} or {run / 'child'}; "
                            "run the `realize` (and `gkd`) stages first")


def report_scenario(run: Path, rcfg: ReportConfig, run_config: dict | None = None):
    """The scenario to time at: report.scenario, else the measure stage's, else the run config's, else
    cpu-b8; a GPU profile is replaced by the same shapes on this machine."""
    from ..cost.scenario import PRESETS, Scenario, load_scenario

    if rcfg.scenario:
        s = load_scenario(rcfg.scenario)
    elif (run / "measure" / "costs.json").exists():
        s = Scenario.from_dict(read_json(run / "measure" / "costs.json")["scenario"])
    elif (run_config or {}).get("scenario"):
        s = load_scenario(run_config["scenario"])
    else:
        s = PRESETS["cpu-b8"]
    if s.is_local and "fp8" not in (s.weight_dtype, s.kv_dtype):
        return s
    # A GPU profile (analytic costs) cannot be timed here: same shapes on this machine's device.
    local = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if local == "cuda" else "float32"
    log.warning("scenario %s targets %s; timing its shapes on %s in %s instead", s.name, s.device, local, dtype)
    return Scenario(f"{s.name}@{local}", s.batch_size, s.prefill_len, s.decode_len, dtype, dtype, local)


def _costs(run: Path, scenario):
    from ..cost.costs import load_costs

    path = run / "measure" / "costs.json"
    if not path.exists():
        return None
    table = load_costs(path)
    return table if (table.scenario.batch_size, table.scenario.prefill_len, table.scenario.decode_len) == \
        (scenario.batch_size, scenario.prefill_len, scenario.decode_len) else None


def _library(run: Path):
    from ..library import Library

    for name in ("library", "init"):
        if (run / name / "space.json").exists():
            return Library(run / name), name
    return None, None


# --------------------------------------------------------------------------- evaluation


def _heldout(run: Path, rcfg: ReportConfig):
    from ..score.stage import heldout_batches

    return heldout_batches(run / "data", rcfg.eval_tokens, rcfg.eval_seq_len, rcfg.eval_batch_size)


def evaluate_checkpoint(run: Path, name: str, path: Path, model, parent, batches, settings: dict) -> dict:
    """Held-out metrics of `model` (loaded from `path`) against the parent, cached in RUN/eval/<name>.json."""
    from ..score.evaluate import evaluate_model

    cache = run / EVAL_DIR / f"{name}.json"
    stamp = (path / "done").stat().st_mtime
    if cache.exists():
        old = read_json(cache)
        if old.get("checkpoint") == str(path) and old.get("settings") == settings and old.get("stamp") == stamp:
            return old["metrics"]
    m = evaluate_model(model, parent, batches)
    metrics = {METRIC_KEYS[k]: m[k] for k in METRIC_KEYS}
    metrics["eval_tokens"] = int(m["tokens"])
    atomic_write_json(cache, {"checkpoint": str(path), "settings": settings, "stamp": stamp, "metrics": metrics})
    return metrics


def canonical_of(model):
    """(config, canonical tensors) of a loaded model; the tensors are a `CanonicalView` that reads (and
    gathers over TP) one layer at a time, so no second copy of the whole model is made."""
    from ..convert.megatron_layout import CanonicalView

    return model.puzzle_config, CanonicalView(model)


# --------------------------------------------------------------------------- baselines


class BaselineBuilder:
    """Selects, realizes and uptrains the baselines of one run (each step skipped when done)."""

    def __init__(self, run: Path, parent, parent_tensors, child_cfg: ModelConfig, scenario, bcfg: BaselinesConfig,
                 run_config: dict, progress: bool = True, threads: int | None = None):
        self.run, self.parent, self.parent_tensors = run, parent, parent_tensors
        self.pcfg: ModelConfig = parent.puzzle_config
        self.child_cfg, self.s, self.cfg, self.run_config = child_cfg, scenario, bcfg, run_config
        self.library, self.library_name = _library(run)
        self.predictor = bl.DecodePredictor(self.pcfg, scenario, _costs(run, scenario))
        self.progress, self.threads = progress, threads

    def measure(self, cand: bl.Candidate) -> float:
        """Decode tokens/s of a candidate over the child's, timed together (16 greedy decode steps around the mean context)."""
        t = measure_throughput({"child": self.child_cfg, "candidate": self.pcfg.with_blocks(cand.blocks)}, self.s,
                               decode_mode="step", warmup=1, repeats=self.cfg.repeats, threads=self.threads,
                               phases=("decode",))
        return t["candidate"].decode_tokens_per_s / t["child"].decode_tokens_per_s

    def _calib(self):
        from ..data import TokenBatches

        data = TokenBatches(self.run / "data", self.cfg.calib_seq_len, 1, shuffle=False, split="calib")
        n = max(1, min(len(data), self.cfg.calib_tokens // self.cfg.calib_seq_len))
        return [data.batch(i) for i in range(n)]

    def _constraints(self) -> list[str]:
        if self.cfg.constraints:
            return list(self.cfg.constraints)
        path = self.run / "search" / "solutions.json"
        if path.exists() and read_json(path).get("constraints"):
            return list(read_json(path)["constraints"])
        raise FileNotFoundError(f"the random baseline needs the child's constraints: {path} has none; "
                                "set baselines.constraints in the run config (e.g. ['decode_throughput>=2.0x'])")

    def select(self, name: str) -> bl.Match:
        child_blocks = self.child_cfg.blocks
        if name == "width":
            if self.library is None:
                raise FileNotFoundError(f"the width baseline needs a block library in {self.run / 'library'}")
            return bl.select_width(self.pcfg, self.library.space, child_blocks, self.predictor, self.measure, self.cfg)
        if name == "depth":
            influence = bl.parent_block_influence(self.parent, self._calib())
            return bl.select_depth(self.pcfg, influence, child_blocks, self.predictor, self.measure, self.cfg)
        if name == "random":
            from ..search import load_problem

            for need in ("score/scores.json", "measure/costs.json"):
                if not (self.run / need).exists():
                    raise FileNotFoundError(f"the random baseline needs {self.run / need}; run its stage first")
            space = self.run / "library" / "space.json"
            problem = load_problem(self.run / "score" / "scores.json", self.run / "measure" / "costs.json",
                                   space if space.exists() else None)
            return bl.select_random(problem, self._constraints(), child_blocks, self.predictor, self.measure, self.cfg)
        raise ValueError(f"unknown baseline {name!r}")

    def build(self, name: str) -> tuple[Path, dict]:
        """The baseline's final checkpoint (after GKD unless skip_gkd) and its arch.json content."""
        d = bl.baseline_dir(self.run, name)
        arch_path = d / bl.ARCH_FILE
        if arch_path.exists():
            arch = read_json(arch_path)
        else:
            match = self.select(name)
            arch = bl.save_arch(arch_path, self.pcfg, match, {"scenario": self.s.to_dict(), "decode_mode": "step",
                                                              "tolerance": self.cfg.tolerance})
        cfg = self.pcfg.with_blocks(bl.load_arch_blocks(self.pcfg, arch))
        if not is_done(d / "child"):
            stats_fn = lambda: self._stats()  # noqa: E731
            weights = bl.BaselineWeights(self.pcfg, cfg.blocks, self.library, self.parent_tensors, stats_fn)
            arch["weights"] = {"sources": weights.sources, "library": self.library_name}
            atomic_write_json(arch_path, arch)
            bl.realize(self.run, name, cfg, weights, {"sources": weights.sources})
        if self.cfg.skip_gkd:
            return d / "child", arch
        gkd_cfg = bl.child_gkd_config(self.run, self.run_config, {"progress": self.progress, **self.cfg.gkd})
        return bl.gkd_baseline(self.run, name, gkd_cfg), arch

    def _stats(self):
        from ..init.calibration import collect_calibration

        return collect_calibration(self.parent, self.parent_tensors, self._calib(), need_channels=True,
                                   need_lstsq=False, progress=self.progress)


# --------------------------------------------------------------------------- the report


def make_report(run_dir: str | Path, config: str | Path | dict | None = None) -> dict:
    """Evaluate, time and compare parent, child and baselines; write report.json, report.md, plots."""
    from tqdm.auto import tqdm

    from ..convert.megatron_io import load_checkpoint_tokenizer
    from ..model import checkpoint
    from ..model.parallel import init_distributed

    run = Path(run_dir)
    rcfg, bcfg, run_config = load_report_config(run, config)
    for need in ("parent", "data"):
        if not is_done(run / need):
            raise FileNotFoundError(f"{run / need} is missing or unfinished; run the stages before eval")
    child_path = child_checkpoint(run)
    steps = ["load"] + [f"baseline {b}" for b in rcfg.baselines] + ["evaluate", "throughput", "generations", "write"]
    bar = tqdm(total=len(steps), desc="report", unit="step", disable=not rcfg.progress)

    def step(name):
        bar.set_description(f"report: {name}")

    step("load")
    init_distributed(1)
    torch.manual_seed(0)
    parent = checkpoint.load(run / "parent")
    parent.eval()
    pcfg, parent_tensors = canonical_of(parent)
    child_cfg = checkpoint.load_config(child_path)
    scenario = report_scenario(run, rcfg, run_config)
    bar.update(1)

    models: dict[str, Path] = {"parent": run / "parent", "child": child_path}
    arches: dict[str, dict] = {}
    builder = BaselineBuilder(run, parent, parent_tensors, child_cfg, scenario, bcfg, run_config, rcfg.progress,
                              rcfg.threads)
    for name in rcfg.baselines:
        step(f"baseline {name}")
        models[f"baseline_{name}"], arches[f"baseline_{name}"] = builder.build(name)
        bar.update(1)

    step("evaluate")
    from ..cost.decilm_runtime import runtime_model

    batches = _heldout(run, rcfg)
    settings = {"tokens": rcfg.eval_tokens, "seq_len": rcfg.eval_seq_len, "batch_size": rcfg.eval_batch_size}
    sections: dict[str, dict[str, Any]] = {}
    runtime: dict[str, torch.nn.Module] = {}
    for name, path in models.items():
        model = parent if name == "parent" else checkpoint.load(path)
        model.eval()
        sections[name] = {"checkpoint": str(path.relative_to(run)),
                          **evaluate_checkpoint(run, name, path, model, parent, batches, settings)}
        # the runtime model that times and generates, copied from the checkpoint one layer at a time
        runtime[name] = runtime_model(*canonical_of(model))
        runtime[name].puzzle_config = model.puzzle_config
        del model
    bar.update(1)

    step("throughput")
    speed = measure_speed(runtime, scenario, rcfg.speed(), progress=rcfg.progress)
    for name, m in runtime.items():
        cfg = m.puzzle_config
        size = model_size(cfg, scenario)
        sections[name].update(params=size.params, weight_bytes=size.weight_bytes, kv_cache_bytes=size.kv_cache_bytes,
                              memory_bytes=size.memory_bytes, **speed.summary(name),
                              variants=[[b.attention.name, b.ffn.name] for b in cfg.blocks])
        if name.startswith("baseline_"):
            r, lo, hi = speed.ratio(name, "child")
            sections[name].update(decode_ratio_to_child=r, decode_ratio_to_child_low=lo,
                                  decode_ratio_to_child_high=hi)
    bar.update(1)

    step("generations")
    tokenizer = load_checkpoint_tokenizer(run / "parent")
    from .generations import generate_all

    gens, repeats = generate_all(runtime, rcfg.prompts, tokenizer, rcfg.gen_tokens, pcfg.vocab_size,
                                 pcfg.eos_token_id) if rcfg.prompts and rcfg.gen_tokens else ([], {})
    for name, share in repeats.items():
        sections[name]["repeated_3grams"] = share
    bar.update(1)

    step("write")
    timing = {"warmup": rcfg.throughput_warmup, "rounds": speed.rounds, "threads": speed.threads,
              "level": speed.level, "statistic": "median tokens/s; speedups: geometric mean of per-round ratios",
              "prefill_s": speed.prefill_s, "decode_s": speed.decode_s}
    report = assemble_report(sections, arches, scenario.to_dict(), rcfg, gens, run, timing, bcfg.tolerance)
    write_plots(run, report)
    atomic_write_json(run / "report.json", report)
    atomic_write_text(run / "report.md", render_markdown(report))
    bar.update(1)
    bar.close()
    return report


def assemble_report(sections: dict, arches: dict, scenario: dict, rcfg: ReportConfig, generations: list,
                    run: Path | None = None, timing: dict | None = None, tolerance: float = 0.05) -> dict:
    """report.json content from per-model sections (metrics + timing); adds ratios, the goal, notes.

    Speedups and baseline-to-child ratios already in a section (per-round ratios from
    report/speed.py, with intervals) are kept; missing ones are ratios of the medians.
    A baseline is `matched` when its ratio to the child is within `tolerance` of 1.
    """
    p = sections["parent"]
    out: dict[str, Any] = {"scenario": scenario, "decode_mode": "loop", "timing": timing or {
        "warmup": rcfg.throughput_warmup, "rounds": rcfg.throughput_repeats, "statistic": "median"}}
    for name, sec in sections.items():
        sec = dict(sec)
        if name != "parent":
            sec.setdefault("decode_speedup", sec["decode_tokens_per_s"] / p["decode_tokens_per_s"])
            sec["prefill_speedup"] = sec["prefill_tokens_per_s"] / p["prefill_tokens_per_s"]
            sec["next_token_accuracy_retained"] = sec["next_token_accuracy"] / p["next_token_accuracy"] \
                if p["next_token_accuracy"] > 0 else float("nan")
        if name.startswith("baseline_"):
            sec.setdefault("decode_ratio_to_child",
                           sec["decode_tokens_per_s"] / sections["child"]["decode_tokens_per_s"])
            sec["matched"] = bool(abs(sec["decode_ratio_to_child"] - 1) <= tolerance)
            a = arches.get(name, {})
            sec["selection"] = {k: a[k] for k in ("key", "decode_ratio_to_child", "within_tolerance", "measurements",
                                                  "info", "weights") if k in a}
            sec["gkd"] = _gkd_summary(run, name)
        out[name] = sec
    c = out["child"]
    met = c["decode_speedup"] >= rcfg.goal_speedup and c["next_token_accuracy_retained"] >= rcfg.goal_accuracy_retained
    out["goal"] = {"decode_speedup": rcfg.goal_speedup, "accuracy_retained": rcfg.goal_accuracy_retained,
                   "reached_decode_speedup": c["decode_speedup"],
                   "reached_accuracy_retained": c["next_token_accuracy_retained"], "met": bool(met),
                   "reached_decode_speedup_interval": [c.get("decode_speedup_low"), c.get("decode_speedup_high")]}
    out["tolerance"] = tolerance
    out["notes"] = comparison_notes(out)
    out["generations"] = generations
    out["plots"] = ["architecture.png", "comparison.png"] + (["pareto.png"] if run and _pareto_source(run) else [])
    return out


def _gkd_summary(run: Path | None, name: str) -> dict | None:
    if run is None:
        return None
    path = bl.baseline_dir(run, name.removeprefix("baseline_")) / "gkd" / "eval.json"
    if not path.exists():
        return None
    e = read_json(path)
    return {"steps": e.get("steps"), "tokens": e.get("tokens"), "loss_weights": e.get("loss_weights")}


def comparison_notes(report: dict) -> list[str]:
    """Plain statements of where the child loses to a baseline (quality at matched throughput), and why it may."""
    c = report["child"]
    notes = []
    for name in [k for k in report if k.startswith("baseline_")]:
        b = report[name]
        lost = [m for m, better in (("kl_to_parent", b["kl_to_parent"] < c["kl_to_parent"]),
                                    ("next_token_accuracy", b["next_token_accuracy"] > c["next_token_accuracy"]))
                if better]
        ratio = b["decode_ratio_to_child"]
        if not b.get("matched", True):
            found = b.get("selection", {}).get("decode_ratio_to_child")
            notes.append(f"{name} is UNMATCHED: in the final rounds it ran at {ratio:.2f}x the child's decode "
                         f"tokens/s" + (f" (its selection had timed {found:.2f}x)" if found else "")
                         + f", outside +-{report.get('tolerance', 0.05):.0%}; compare its quality with care.")
        if not lost:
            notes.append(f"{name}: the child is better on KL and next-token accuracy "
                         f"(baseline at {ratio:.2f}x the child's decode tokens/s).")
            continue
        why = []
        if ratio < 1 - report.get("tolerance", 0.05):
            why.append(f"it is slower than the child ({ratio:.2f}x decode tokens/s), so it keeps more compute")
        if not b.get("selection", {}).get("within_tolerance", True):
            why.append("no candidate of its family was timed within the tolerance of the child's throughput")
        if b.get("gkd"):
            why.append("the same short GKD budget may favour the model whose layers changed least")
        why.append("the search ranks blocks by replace-one-block scores, assumed additive; at this compression "
                   "their sum mis-ranks whole architectures more than at mild compression")
        notes.append(f"{name} beats the child on {' and '.join(lost)} "
                     f"(KL {b['kl_to_parent']:.4f} vs {c['kl_to_parent']:.4f}, accuracy "
                     f"{b['next_token_accuracy']:.4f} vs {c['next_token_accuracy']:.4f}). Possible reasons: "
                     + "; ".join(why) + ".")
    return notes


# --------------------------------------------------------------------------- plots


def _pareto_source(run: Path) -> Path | None:
    p = run / "search" / "pareto.png"
    return p if p.exists() else None


def write_plots(run: Path, report: dict) -> None:
    from ..search.plots import _figure, _save, plot_architecture

    c = report["child"]
    plot_architecture(c["variants"], run / "architecture.png",
                      title=f"child: {c['decode_speedup']:.2f}x decode tokens/s, "
                            f"{c['next_token_accuracy_retained']:.1%} of the parent's next-token accuracy")
    src = _pareto_source(run)
    if src is not None:
        with atomic_path(run / "pareto.png") as tmp:
            shutil.copyfile(src, tmp)
    fig = _figure(9.0, 3.8)
    ax1, ax2 = fig.subplots(1, 2)
    names = ["parent", "child"] + [k for k in report if k.startswith("baseline_")]
    for i, name in enumerate(names):
        s = report[name]
        marker = {"parent": "*", "child": "o"}.get(name, "s")
        for ax, key in ((ax1, "next_token_accuracy"), (ax2, "kl_to_parent")):
            ax.plot([s["decode_tokens_per_s"]], [s[key]], marker, color=f"C{i}", markersize=10 if i < 2 else 7,
                    label=name.removeprefix("baseline_"))
    ax1.set_ylabel("next-token accuracy (held-out)")
    ax2.set_ylabel("KL(parent || model) (held-out)")
    for ax in (ax1, ax2):
        ax.set_xlabel("decode tokens/s (measured)")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle("quality vs measured decode throughput", fontsize=10)
    _save(fig, run / "comparison.png")


# --------------------------------------------------------------------------- markdown


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def render_markdown(report: dict) -> str:
    s = report["scenario"]
    names = ["parent", "child"] + [k for k in report if k.startswith("baseline_")]
    t = report["timing"]
    level = t.get("level")
    lines = ["# Puzzle report", "",
             f"Scenario `{s['name']}`: batch {s['batch_size']}, prompt {s['prefill_len']}, generation "
             f"{s['decode_len']} tokens, {s['weight_dtype']} on {s['device']}; every model's greedy generation "
             f"timed in one process with the DeciLM runtime, {t['rounds']} interleaved rounds"
             + (f", {t['threads']} threads" if t.get("threads") else "") + ": tokens/s are medians, speedups "
             "geometric means of per-round ratios" + (f" [{level:.0%} interval]" if level else "") + ".", "",
             "| model | params | memory | prefill tok/s | decode tok/s | decode speedup | vs child | KL to parent "
             "| LM loss | next-token acc | top-1 agreement | repeated 3-grams |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        r = report[n]
        speed = "1.00x" if n == "parent" else f"{r['decode_speedup']:.2f}x" + (
            f" [{r['decode_speedup_low']:.2f}, {r['decode_speedup_high']:.2f}]" if "decode_speedup_low" in r else "")
        vs = ""
        if n.startswith("baseline_"):
            vs = f"{r['decode_ratio_to_child']:.2f}x" + ("" if r.get("matched", True) else " **unmatched**")
        rep3 = r.get("repeated_3grams")
        rep3 = "" if rep3 is None or rep3 != rep3 else f"{rep3:.0%}"
        lines.append(f"| {n} | {r['params'] / 1e6:.1f}M | {_gib(r['memory_bytes'])} | {r['prefill_tokens_per_s']:.0f} "
                     f"| {r['decode_tokens_per_s']:.1f} | {speed} | {vs} | {r['kl_to_parent']:.4f} "
                     f"| {r['lm_loss']:.4f} "
                     f"| {r['next_token_accuracy']:.4f} | {r['top1_agreement']:.4f} | {rep3} |")
    g = report["goal"]
    lines += ["", f"**Goal** (>= {g['decode_speedup']:.1f}x decode throughput keeping >= "
                  f"{g['accuracy_retained']:.0%} of the parent's next-token accuracy): reached "
                  f"{g['reached_decode_speedup']:.2f}x"
                  + (" [{:.2f}, {:.2f}]".format(*g["reached_decode_speedup_interval"])
                     if None not in g.get("reached_decode_speedup_interval", [None]) else "")
                  + f" and {g['reached_accuracy_retained']:.1%} -> "
                  f"**{'met' if g['met'] else 'not met'}**.", ""]
    if report["notes"]:
        lines += ["## Child vs baselines (same measured throughput, same GKD budget)", ""]
        lines += [f"- {n}" for n in report["notes"]] + [""]
    if report["generations"]:
        lines += ["## Greedy generations", ""]
        for row in report["generations"]:
            lines.append(f"**{row['prompt']}**")
            lines += [f"- {k}: {' '.join(str(v).split())}" for k, v in row.items() if k != "prompt"]
            lines.append("")
    lines += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in report["plots"]] + [""]
    return "\n".join(lines)
