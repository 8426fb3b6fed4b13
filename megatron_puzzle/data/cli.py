"""`megatron-puzzle data`: tokenize a corpus into RUN/data token shards."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from megatron_puzzle.cli import UserError
from megatron_puzzle.data.shards import DEFAULT_BUDGETS

log = logging.getLogger(__name__)


def load_tokenizer(spec: str | Path):
    """The HF tokenizer of a model directory or a .gguf file (or a model name in the local HF cache)."""
    path = Path(spec)
    try:
        try:
            from megatron_puzzle.convert.hf_io import load_tokenizer as load_hf_tokenizer
        except ImportError:  # the convert stage is optional here
            load_hf_tokenizer = None
        if load_hf_tokenizer is not None and path.exists():
            return load_hf_tokenizer(path)
        from transformers import AutoTokenizer

        if path.is_file() and path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(spec))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {spec} ({e}); pass a HF model directory or a .gguf file") from None


def _run(args: argparse.Namespace) -> int:
    from megatron_puzzle.data.stage import DataConfig, run_data

    out_dir = Path(args.run_dir) / "data"
    tokenizer = load_tokenizer(args.tokenizer)
    cfg = DataConfig(source=args.source, train_tokens=args.train_tokens, calib_tokens=args.calib_tokens,
                     heldout_tokens=args.heldout_tokens, seed=args.seed, overwrite=args.overwrite)
    try:
        meta = run_data(args.run_dir, cfg, tokenizer, tokenizer_label=str(args.tokenizer))
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # bad budgets, sources, existing shards
        raise UserError(str(e)) from None
    counts = ", ".join(f"{name} {s['tokens']}" for name, s in meta["splits"].items())
    print(f"token shards in {out_dir}: {counts} tokens from {meta['source']} ({meta['tokenizer']})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("data", help="tokenize a corpus into train / calib / heldout token shards (RUN/data)")
    p.add_argument("--run-dir", required=True, help="run directory; shards go to RUN_DIR/data")
    p.add_argument("--tokenizer", required=True, help="the parent's tokenizer: HF model directory or .gguf file")
    p.add_argument(
        "--source",
        default="web",
        help="web (World English Bible, Debian package sword-text-web), sample (shipped excerpt), fortunes, "
        "or a path: .txt file (documents split at blank lines), .jsonl file ('text' field), "
        "a directory of them, or a SWORD zText module; or tokens already in Megatron's indexed format: a "
        "PREFIX of PREFIX.bin/.idx, or a blend 'megatron:0.7 PREFIX_A 0.3 PREFIX_B' (default: web)",
    )
    for name, default in DEFAULT_BUDGETS.items():
        p.add_argument(f"--{name}-tokens", type=int, default=default, metavar="N",
                       help=f"tokens in the {name} split (default {default})")
    p.add_argument("--seed", type=int, default=0, help="default shuffling seed of loaders over these shards")
    p.add_argument("--overwrite", action="store_true", help="rebuild shards made with other settings")
    p.set_defaults(func=_run)
