"""Training text against generations: GKD of one realized child on the run's text, or on a mix
with sampled text, each judged on held-out text and on greedy generations.

    python benchmarks/training_text.py --run-dir RUN --out OUT --steps 60 --parent-share 0 0.5 \
        [--also "child, 300 steps=RUN/gkd/final"] [--png docs/training_text.png]
    python benchmarks/training_text.py --run-dir RUN --out OUT2 --sampler init --init CKPT --temperature 0 \
        --steps 100 --parent-share 0 0.5
    python benchmarks/training_text.py --run-dir RUN --out OUT3 --parent-share --sample-tokens 128 \
        --also "run 1=RUN1/gkd/final" "run 2=RUN2/gkd/final"    # judge finished children only
    python benchmarks/training_text.py --plot OUT/training_text.json --png docs/training_text.png

RUN is a run directory holding parent/, data/ and child/ (e.g. `megatron-puzzle run --until
realize`). The script
1. samples `--sample-tokens` tokens of train text (OUT/samples.npz; kept when present) in rows of
   `--sample-len` tokens: from the parent (`--sampler parent`, each row from EOS), or from the start
   checkpoint `--init` continuing `--prefix-tokens` tokens of the run's train text (`--sampler init`:
   the contexts the child writes itself, loops included); temperature `--temperature` (0: greedy)
   and nucleus `--top-p`. It also samples `--heldout-sample-tokens` of parent text, another seed, to
   judge on;
2. for each share S (`--parent-share`) uptrains a fresh copy of the start checkpoint (RUN/child
   unless `--init`) with the run's GKD settings and `--steps` steps, on a train split where a share
   S of the tokens is the sampled text and the rest the run's own training text, interleaved in
   blocks (OUT/share<S>/, its data/ a copy of RUN/data with that train split). The KL and cosine
   terms are against the parent; the LM term (`--loss lm=0` drops it) learns the train text itself,
   sampled rows included;
3. judges the parent, RUN/child before GKD, the start checkpoint, every uptrained child and every
   `--also` checkpoint alike: KL, LM loss, next-token accuracy on the run's held-out text (the
   report's 4096 tokens) and on the held-out parent text; the share of repeated 3-grams in greedy
   continuations of `--gen-tokens` tokens from general prompts (GENERAL_PROMPTS) and from the
   starts of held-out documents (in-domain prompts).

OUT/training_text.json holds every figure and every continuation; finished items are skipped, so
a killed run resumes. The table is printed, and `--png` draws the figures side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_eval_options, loss_weights, run_gkd_settings, setup_process  # a sibling of this script

log = logging.getLogger("training_text")

# Plain completions of everyday text: what a user of a general model types. The report's own three
# prompts come first.
GENERAL_PROMPTS = (
    "The capital of France is", "In the beginning God created", "A good way to learn a new language is",
    "The best thing about summer is", "Water boils at", "My favourite book is", "The history of the Roman Empire",
    "To make a cup of tea, you", "Scientists have discovered that", "The most important thing in life is",
    "Once upon a time, there was a", "Computers are useful because", "The largest animal on Earth is",
    "When I was a child, I", "The main causes of climate change are", "A healthy breakfast includes",
)
BLOCK = 4096  # tokens per interleaved block of the mixed train split
PROMPT_TOKENS = 12  # tokens of a held-out document that make an in-domain prompt


def sample_rows(model, prefixes: np.ndarray, new_tokens: int, batch: int, temperature: float, top_p: float,
                seed: int, dtype=None, who: str = "the parent") -> np.ndarray:
    """[rows, prefix + new_tokens] token ids: each prefix row continued by `model` (run in `dtype`,
    default bf16) with temperature and nucleus sampling, or greedily at temperature 0."""
    import torch
    from transformers.cache_utils import DynamicCache

    from megatron_puzzle.cost.decilm_runtime import runtime_model
    from megatron_puzzle.distill.gkd import next_tokens
    from megatron_puzzle.report.make import canonical_of

    runtime = runtime_model(*canonical_of(model), dtype=dtype or torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    rows, total, t0 = [], len(prefixes), time.perf_counter()
    with torch.no_grad():
        for first in range(0, total, batch):
            ids = torch.from_numpy(np.asarray(prefixes[first:first + batch], dtype=np.int64))
            cache, out = DynamicCache(), [ids]
            for _ in range(new_tokens):
                logits = runtime(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
                ids = next_tokens(logits, None if temperature == 0 else gen, temperature, top_p)
                out.append(ids)
            rows.append(torch.cat(out, 1).numpy())
            done = first + len(rows[-1])
            log.info("sampled %d/%d rows from %s (%.0f tokens/s)", done, total, who,
                     done * new_tokens / (time.perf_counter() - t0))
    return np.concatenate(rows).astype(np.int64)


def sample_parent(parent, tokens: int, length: int, batch: int, temperature: float, top_p: float, seed: int,
                  start: int, dtype=None) -> np.ndarray:
    """[rows, length + 1] token ids sampled from the parent, each row from the token `start`."""
    prefixes = np.full((-(-tokens // length), 1), start, dtype=np.int64)
    return sample_rows(parent, prefixes, length, batch, temperature, top_p, seed, dtype)


def train_prefixes(run: Path, rows: int, length: int, seed: int) -> np.ndarray:
    """[rows, length]: windows of the run's train text at random places (seeded), as prompts to continue."""
    from megatron_puzzle.data.shards import load_split

    own = np.asarray(load_split(run / "data", "train"))
    starts = np.random.default_rng(seed).choice(len(own) - length, size=rows, replace=False)
    return np.stack([own[s:s + length] for s in np.sort(starts)]).astype(np.int64)


def mixed_data(run: Path, dest: Path, parent_rows: np.ndarray, share: float, block: int = BLOCK) -> int:
    """dest/: RUN/data with its train split replaced by `share` parent text (from the first row) and
    the rest the run's own train text (from its start), as much as the share allows, interleaved in `block`-token blocks, written as a Megatron
    indexed dataset (dest/train_mixed); returns the train split's tokens."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_puzzle.data.shards import load_split, read_meta
    from megatron_puzzle.utils.io import DONE_MARKER, atomic_write_json

    if (dest / DONE_MARKER).exists():
        return int(read_meta(dest)["splits"]["train"]["tokens"])
    meta = read_meta(run / "data")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run / "data", tmp)
    own = np.asarray(load_split(run / "data", "train"))
    theirs = parent_rows.reshape(-1)
    if share >= 1:
        own = own[:0]
    elif share > 0:
        need = int(len(theirs) * (1 - share) / share)
        if need > len(own):  # too little of the run's text for all the samples: use fewer, so the share holds
            theirs = theirs[: round(len(own) * share / (1 - share))]
        else:
            own = own[:need]
    else:
        theirs = theirs[:0]
    blocks = [own[i:i + block] for i in range(0, len(own), block)]
    others = [theirs[i:i + block] for i in range(0, len(theirs), block)]
    import torch

    prefix = str(tmp / "train_mixed")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(int(meta["vocab_size"])))
    for i in range(max(len(blocks), len(others))):
        for part in ([blocks[i]] if i < len(blocks) else []) + ([others[i]] if i < len(others) else []):
            builder.add_document(torch.from_numpy(part.astype(np.int64)), [len(part)])
    builder.finalize(prefix + ".idx")
    meta["splits"]["train"].update(file="train_mixed", tokens=int(len(own) + len(theirs)))
    meta["splits"]["train"]["parent_share"] = share
    atomic_write_json(tmp / "meta.json", meta)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return meta["splits"]["train"]["tokens"]


def repeating_positions(rows, prefix: int, n: int = 3) -> np.ndarray:
    """Bool per position of each row of `rows` ([rows, length], or one row): True where the n-gram ending
    there occurred earlier in the row (prefix included), for positions from `prefix` on (the sampled
    part); False elsewhere."""
    import torch

    from megatron_puzzle.model.losses import repeat_mask

    x = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    out = repeat_mask(x.reshape(-1, x.shape[-1]), n).numpy().reshape(x.shape)
    out[..., :prefix] = False
    return out


def loop_agreement(model, rows: np.ndarray, prefix: int, batch: int = 8) -> dict:
    """How `model` judges sampled rows, apart at the positions that repeat a 3-gram (a loop going
    on) and the others: the share where its argmax is the sampled token, and its mean probability
    of that token."""
    import torch

    from megatron_puzzle.report.make import canonical_of
    from megatron_puzzle.cost.decilm_runtime import runtime_model

    runtime = runtime_model(*canonical_of(model))
    sums = {key: np.zeros(3) for key in (True, False)}  # positions, argmax hits, probability
    with torch.no_grad():
        for first in range(0, len(rows), batch):
            x = torch.from_numpy(np.asarray(rows[first:first + batch], dtype=np.int64))
            probs = runtime(input_ids=x[:, :-1]).logits.float().softmax(-1)  # position t - 1 predicts token t
            target = x[:, 1:]
            prob = probs.gather(-1, target.unsqueeze(-1)).squeeze(-1).numpy()
            hit = (probs.argmax(-1) == target).numpy()
            rep = repeating_positions(x.numpy(), prefix)[:, 1:]
            judged = np.zeros_like(rep)
            judged[:, max(prefix, 1) - 1:] = True
            for key in (True, False):
                m = judged & (rep == key)
                sums[key] += (m.sum(), hit[m].sum(), prob[m].sum())
    out = {}
    for key, name in ((True, "repeating"), (False, "new")):
        n, hits, prob = sums[key]
        out[name] = {"positions": int(n), "argmax_is_sample": hits / n if n else float("nan"),
                     "mean_prob": prob / n if n else float("nan")}
    return out


def in_domain_prompts(run: Path, n: int, bos: int | None) -> list[list[int]]:
    """The first PROMPT_TOKENS tokens of n held-out documents, spread over the split."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_puzzle.data.shards import read_meta

    ds = IndexedDataset(str(run / "data" / read_meta(run / "data")["splits"]["heldout"]["file"]))
    bounds = ds.document_indices
    docs = len(bounds) - 1
    picks = sorted({int(d * docs / n) for d in range(n)})
    head = [] if bos is None else [bos]
    return [head + [int(t) for t in ds[int(bounds[d])][:PROMPT_TOKENS]] for d in picks]


def judge(path, parent, tokenizer, heldout, parent_text, general, in_domain, gen_tokens: int) -> dict:
    """Held-out metrics on both texts and repeated 3-grams of greedy continuations, for one checkpoint."""
    import torch

    from megatron_puzzle.model import checkpoint
    from megatron_puzzle.report.generations import decode, greedy, repeated_ngrams
    from megatron_puzzle.report.make import canonical_of
    from megatron_puzzle.cost.decilm_runtime import runtime_model
    from megatron_puzzle.score.evaluate import evaluate_model

    model = parent if path is None else checkpoint.load(path)
    model.eval()
    out: dict = {}
    with torch.no_grad():
        for name, batches in (("heldout", heldout), ("parent_text", parent_text)):
            m = evaluate_model(model, parent, batches)
            out[name] = {k: float(m[k]) for k in ("kl_div", "lm_loss", "accuracy", "top1_agreement")}
    runtime = runtime_model(*canonical_of(model))
    eos = model.puzzle_config.eos_token_id
    for name, prompts in (("general", general), ("in_domain", in_domain)):
        reps = total = 0
        shown = []
        for ids in prompts:
            cont = greedy(runtime, ids, gen_tokens, eos)
            r, t = repeated_ngrams(cont)
            reps, total = reps + r, total + t
            shown.append([decode(tokenizer, ids), decode(tokenizer, cont)])
        out[f"repeated_3grams_{name}"] = reps / total if total else float("nan")
        out[f"generations_{name}"] = shown
    return out


def run(args) -> dict:
    import torch
    import yaml

    from megatron_puzzle.convert.megatron_io import load_checkpoint_tokenizer
    from megatron_puzzle.distill.gkd import FINAL_DIR, RESUME_FREE, STAGE_DIR, GKDConfig, run_gkd
    from megatron_puzzle.model import checkpoint
    from megatron_puzzle.model.parallel import init_distributed
    from megatron_puzzle.score.stage import heldout_batches
    from megatron_puzzle.utils.io import atomic_write_json

    run_dir, out = Path(args.run_dir), Path(args.out)
    for name in ("parent", "data", "child"):
        if not (run_dir / name).is_dir():
            raise SystemExit(f"{run_dir}/{name} is missing; run `megatron-puzzle run --run-dir {run_dir} --until realize`")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "training_text.json"
    data = json.loads(path.read_text()) if path.exists() else {"models": {}}
    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed(1)
    parent = checkpoint.load(run_dir / "parent")
    parent.eval()
    tokenizer = load_checkpoint_tokenizer(run_dir / "parent")
    # EOS: what the run's shards put between documents, so a sample starts as a new document does
    start = int(tokenizer.eos_token_id) if args.start is None else args.start

    samples = out / "samples.npz"
    init = Path(args.init) if args.init else run_dir / "child"
    if not samples.exists():
        t0 = time.perf_counter()
        if args.sampler == "parent":
            train = sample_parent(parent, args.sample_tokens, args.sample_len, args.sample_batch, args.temperature,
                                  args.top_p, seed=0, start=start)
        else:  # the start checkpoint continues stretches of the run's own text: contexts it writes itself
            new_tokens = args.sample_len - args.prefix_tokens
            prefixes = train_prefixes(run_dir, -(-args.sample_tokens // args.sample_len), args.prefix_tokens, seed=0)
            train = sample_rows(checkpoint.load(init), prefixes, new_tokens, args.sample_batch, args.temperature,
                                args.top_p, seed=0, who=str(init))
        seconds = time.perf_counter() - t0
        held = sample_parent(parent, args.heldout_sample_tokens, args.sample_len, args.sample_batch,
                             args.temperature if args.sampler == "parent" else 1.0, args.top_p, seed=1, start=start)
        tmp = out / "samples.tmp.npz"
        np.savez(tmp, train=train, heldout=held)
        tmp.rename(samples)
        data["sampling"] = {"sampler": args.sampler, "train_tokens": int(train.size), "heldout_tokens": int(held.size),
                            "seconds": seconds, "temperature": args.temperature, "top_p": args.top_p,
                            "start_token": start, "row_tokens": args.sample_len,
                            "prefix_tokens": args.prefix_tokens if args.sampler == "init" else 0}
        atomic_write_json(path, data)
    rows = np.load(samples)
    heldout = heldout_batches(run_dir / "data", args.eval_tokens, args.eval_seq_len, args.eval_batch_size)
    held_rows = torch.from_numpy(rows["heldout"])
    parent_text = [held_rows[i:i + args.eval_batch_size] for i in range(0, len(held_rows), args.eval_batch_size)]
    general = [[tokenizer.bos_token_id] * (tokenizer.bos_token_id is not None)
               + tokenizer(p, add_special_tokens=False)["input_ids"] for p in GENERAL_PROMPTS]
    in_domain = in_domain_prompts(run_dir, args.in_domain_prompts, tokenizer.bos_token_id)

    def judged(label, ckpt, **extra):
        if label in data["models"]:
            return
        log.info("judging %s", label)
        data["models"][label] = {**extra, **judge(ckpt, parent, tokenizer, heldout, parent_text, general,
                                                  in_domain, args.gen_tokens)}
        atomic_write_json(path, data)

    if args.sampler == "init" and "loop_agreement" not in data["sampling"]:
        # does the parent break the start checkpoint's loops? its verdict on the sampled rows
        data["sampling"]["loop_agreement"] = {
            name: loop_agreement(model, rows["train"], args.prefix_tokens)
            for name, model in (("parent", parent), (args.init_label, checkpoint.load(init)))}
        atomic_write_json(path, data)
    judged("parent", None)
    judged("before GKD", run_dir / "child", steps=0)
    if args.init:
        judged(args.init_label, init)
    gkd_cfg = run_gkd_settings(run_dir)
    if args.loss:
        gkd_cfg["loss"] = {**(gkd_cfg.get("loss") or {}), **loss_weights(args.loss)}
    # the run's own checkpoint cadence is of no use here (none by default); a --gkd-set one is kept
    gkd_cfg = {**gkd_cfg, "save_interval": 0}
    for item in args.gkd_set or []:
        key, _, value = item.partition("=")
        gkd_cfg[key] = yaml.safe_load(value)
    # settings that leave the curve alone (checkpoint cadence, progress, ...) do not name the child
    curve_set = [x for x in args.gkd_set or [] if x.partition("=")[0] not in RESUME_FREE]
    text = "parent text" if args.sampler == "parent" else "own samples"
    for share in args.parent_share:
        label = f"{args.steps} steps, {share:.0%} {text}" + (f", from {args.init_label}" if args.init else "") \
            + (f", loss {args.loss}" if args.loss else "") + "".join(f", {x}" for x in curve_set)
        if label in data["models"]:
            continue
        suffix = "".join(f"_{x}" for x in [args.loss] + curve_set if x)
        work = out / (f"share{share:g}" + suffix.replace(",", "_").replace("=", ""))
        work.mkdir(parents=True, exist_ok=True)
        for name, src in (("parent", run_dir / "parent"), ("child", init)):
            if not (work / name).exists():
                (work / name).symlink_to(src.resolve(), target_is_directory=True)
        train_tokens = mixed_data(run_dir, work / "data", rows["train"], share)
        gcfg = GKDConfig.from_dict({**gkd_cfg, "steps": args.steps, "eval_tokens": 0,
                                    "progress": not args.no_progress})
        t0 = time.perf_counter()
        run_gkd(work, gcfg)
        judged(label, work / STAGE_DIR / FINAL_DIR, steps=args.steps, sampled_share=share, sampler=args.sampler,
               train_tokens=train_tokens, gkd_wall_s=time.perf_counter() - t0)
    for item in args.also or []:
        label, _, ckpt = item.rpartition("=")
        judged(label or ckpt, Path(ckpt))
    return data


def table(data: dict) -> str:
    parent = data["models"]["parent"]
    lines = [("| model | held-out acc kept | held-out KL | parent-text acc kept | parent-text KL "
              "| repeated 3-grams, general prompts | repeated 3-grams, in-domain prompts |"),
             "|---|---|---|---|---|---|---|"]
    for label, m in data["models"].items():
        h, p = m["heldout"], m["parent_text"]
        lines.append(f"| {label} | {h['accuracy'] / parent['heldout']['accuracy']:.1%} | {h['kl_div']:.3f} "
                     f"| {p['accuracy'] / parent['parent_text']['accuracy']:.1%} | {p['kl_div']:.3f} "
                     f"| {m['repeated_3grams_general']:.0%} | {m['repeated_3grams_in_domain']:.0%} |")
    return "\n".join(lines)


def plot(data: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(data["models"])
    parent = data["models"]["parent"]
    panels = (("held-out accuracy kept (%)", lambda m: 100 * m["heldout"]["accuracy"] / parent["heldout"]["accuracy"]),
              ("parent-text KL", lambda m: m["parent_text"]["kl_div"]),
              ("repeated 3-grams (%)", None))
    fig, axes = plt.subplots(1, 3, figsize=(13, 1.5 + 0.45 * len(labels)))
    y = np.arange(len(labels))
    for ax, (title, fn) in zip(axes, panels):
        if fn is None:
            ax.barh(y - 0.2, [100 * data["models"][k]["repeated_3grams_general"] for k in labels], 0.4,
                    label="general prompts")
            ax.barh(y + 0.2, [100 * data["models"][k]["repeated_3grams_in_domain"] for k in labels], 0.4,
                    label="in-domain prompts")
            ax.legend(fontsize=7)
        else:
            ax.barh(y, [fn(data["models"][k]) for k in labels])
        ax.set_yticks(y, [textwrap.fill(k, 34) for k in labels] if ax is axes[0] else [""] * len(labels), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("training text against held-out quality and greedy repetition", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", help="run directory with parent/, data/, child/")
    p.add_argument("--out", help="output directory (training_text.json, samples, one dir per share)")
    p.add_argument("--steps", type=int, default=60, help="GKD steps of every uptrained child")
    p.add_argument("--parent-share", type=float, nargs="*", default=[0.0, 0.5],
                   help="shares of sampled text in the train split, one uptrained child each (none: judge the "
                        "--also checkpoints only)")
    p.add_argument("--sampler", choices=("parent", "init"), default="parent",
                   help="who writes the sampled train text: the parent (each row from --start), or the --init "
                        "checkpoint continuing --prefix-tokens tokens of the run's train text")
    p.add_argument("--loss", help="loss weights of every uptrained child, e.g. lm=0 (unnamed terms keep the run's)")
    p.add_argument("--gkd-set", nargs="*", help="more GKD settings of every uptrained child, KEY=VALUE (e.g. "
                                                "skip_repeats=true)")
    p.add_argument("--init", help="checkpoint every uptrained child starts from (default RUN/child)")
    p.add_argument("--init-label", default="start", help="the --init checkpoint's name in the table")
    p.add_argument("--prefix-tokens", type=int, default=32, help="--sampler init: prompt tokens per row")
    p.add_argument("--also", nargs="*", help="more checkpoints to judge, as PATH or LABEL=PATH (e.g. RUN/gkd/final)")
    p.add_argument("--sample-tokens", type=int, default=16384, help="parent text to train on")
    p.add_argument("--heldout-sample-tokens", type=int, default=4096, help="parent text to judge on")
    p.add_argument("--sample-len", type=int, default=128, help="tokens per sampled row")
    p.add_argument("--sample-batch", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--start", type=int, help="token each sample starts from (default: EOS)")
    p.add_argument("--gen-tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--in-domain-prompts", type=int, default=16)
    add_eval_options(p)
    p.add_argument("--png", help="draw the figures here")
    p.add_argument("--plot", help="print and draw this training_text.json instead of running")
    args = p.parse_args(argv)
    setup_process()
    if args.plot:
        data = json.loads(Path(args.plot).read_text())
    else:
        if not args.run_dir or not args.out:
            p.error("--run-dir and --out are needed (or --plot FILE)")
        for s in args.parent_share:
            if not 0 <= s <= 1:
                p.error(f"--parent-share takes shares in [0, 1], got {s}")
        if args.sampler == "init" and not 0 < args.prefix_tokens < args.sample_len:
            p.error(f"--prefix-tokens must be in (0, --sample-len={args.sample_len}), got {args.prefix_tokens}")
        data = run(args)
    print(table(data))
    for name, a in data.get("sampling", {}).get("loop_agreement", {}).items():
        print(f"{name} on the sampled rows: argmax is the sampled token at {a['repeating']['argmax_is_sample']:.1%} "
              f"of {a['repeating']['positions']} positions repeating a 3-gram (mean p {a['repeating']['mean_prob']:.3f}), "
              f"at {a['new']['argmax_is_sample']:.1%} of {a['new']['positions']} others (mean p {a['new']['mean_prob']:.3f})")
    if args.png:
        plot(data, Path(args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
