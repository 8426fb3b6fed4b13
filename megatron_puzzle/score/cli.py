"""`megatron-puzzle score`: replace-1-block scores of every library variant (RUN/score/scores.json)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..cli import add_pipeline_arguments
from ..model.metrics import ALL_METRICS, METRICS

log = logging.getLogger(__name__)


def _run(args: argparse.Namespace) -> int:
    from ..utils.io import sweep_before_start
    from .stage import ScoreConfig, run_score

    run = Path(args.run_dir)
    sweep_before_start(run / "score")
    cfg = ScoreConfig(tokens=args.tokens, batch_size=args.batch_size, seq_len=args.seq_len, coupled=args.coupled,
                      metrics=args.metric, variants=args.variants, tensor_parallel=args.tensor_parallel,
                      pipeline_parallel=args.pipeline_parallel, pp_first_stage_layers=args.pp_first_stage_layers,
                      pp_last_stage_layers=args.pp_last_stage_layers, max_entries=args.max_entries, force=args.force)
    scores = run_score(run, cfg)
    if scores is not None:
        n = sum(len(layer) for layer in scores["layers"])
        print(f"scored {n} (layer, variant) entries on {scores['tokens']} held-out tokens: {run / 'score' / 'scores.json'}")
    return 0


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def register(subparsers) -> None:
    p = subparsers.add_parser("score", help="replace-1-block scores of the block library (RUN/score/scores.json)")
    p.add_argument("--run-dir", required=True, help="run directory with parent/, data/ and library/")
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens to score on (default 16384)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--metric", nargs="+", default=list(METRICS), choices=ALL_METRICS,
                   help=f"metrics written to scores.json (default: {' '.join(METRICS)}; kl_div is the search default)")
    p.add_argument("--coupled", action="store_true",
                   help="score attention+FFN pairs of each layer together (keys like attn_kv1+ffn_768)")
    p.add_argument("--variants", type=_names, default=None, metavar="A,B,...",
                   help="score only these variant names (a reduced set, e.g. for --coupled)")
    p.add_argument("--tensor-parallel", type=int, default=1, help="tensor-parallel size (launch with torchrun)")
    add_pipeline_arguments(p, "the parent split over this many stages")
    p.add_argument("--max-entries", type=int, default=64,
                   help="entries (built layers) kept in memory at once (one parent pass per batch per group)")
    p.add_argument("--force", action="store_true", help="score again even what is cached")
    p.set_defaults(func=_run)
