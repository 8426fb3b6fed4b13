"""`megatron-puzzle gkd`: global knowledge distillation of RUN/child from RUN/parent.

Settings come from GKDConfig defaults, then a YAML file (`--config`, flat or under a
`gkd:` key), then the flags given. For TP/PP/DP launch under torchrun (world = TP x PP x DP):
  torchrun --nproc-per-node 4 $(which megatron-puzzle) gkd --run-dir RUN --tp 2 --pp 2 --micro-batch-size 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

_FLAGS = {  # flag -> (GKDConfig field, type, help)
    "--steps": ("steps", int, "optimizer steps"),
    "--tokens": ("tokens", int, "training tokens (overrides --steps)"),
    "--batch-size": ("batch_size", int, "sequences per data-parallel rank per step"),
    "--seq-len": ("seq_len", int, "tokens per sequence"),
    "--lr": ("lr", float, "peak learning rate"),
    "--min-lr": ("min_lr", float, "learning rate at the end of the cosine decay"),
    "--warmup": ("warmup", int, "linear warm-up steps"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay"),
    "--clip": ("clip", float, "global gradient-norm limit (0: off)"),
    "--temperature": ("temperature", float, "softmax temperature of the KL term"),
    "--save-interval": ("save_interval", int, "steps between checkpoints (0: none)"),
    "--eval-tokens": ("eval_tokens", int, "held-out tokens evaluated before and after (0: skip)"),
    "--tp": ("tp", int, "tensor-parallel size"),
    "--pp": ("pp", int, "pipeline-parallel size (student and teacher split alike)"),
    "--pp-first-stage-layers": ("pp_first_stage_layers", int, "layers on the first pipeline stage (uneven split)"),
    "--pp-last-stage-layers": ("pp_last_stage_layers", int, "layers on the last pipeline stage (uneven split)"),
    "--micro-batch-size": ("micro_batch_size", int, "sequences per micro-batch (divides --batch-size)"),
    "--dtype": ("dtype", str, "auto (bf16 on GPU), fastest (also bf16 on CPUs with bf16 units), "
                                  "float32 or bfloat16 (bf16 autocast, fp32 master weights)"),
    "--fp8": ("fp8", str, "hybrid or e4m3: FP8 through Transformer Engine for the student (Hopper GPUs)"),
    "--fp8-recipe": ("fp8_recipe", str, "delayed (amax history) or tensorwise (current scaling)"),
    "--teacher-dtype": ("teacher_dtype", str, "the frozen parent's weights: auto, fastest, "
                                                  "float32 or bfloat16 (as --dtype)"),
    "--seed": ("seed", int, "seed"),
}
_WEIGHTS = {"--cosine-weight": "cosine", "--kl-weight": "kl", "--lm-weight": "lm"}


def _config(args: argparse.Namespace):
    from ..cli import UserError
    from .gkd import GKDConfig

    try:
        cfg = GKDConfig.from_yaml(args.config).to_dict() if args.config else GKDConfig().to_dict()
        for flag, (name, _, _) in _FLAGS.items():
            value = getattr(args, name)
            if value is not None:
                cfg[name] = value
        for flag, term in _WEIGHTS.items():
            value = getattr(args, f"w_{term}")
            if value is not None:
                cfg["loss"] = {**cfg["loss"], term: value}
        if args.no_progress:
            cfg["progress"] = False
        for flag in ("shard_optimizer", "recompute", "optimizer_cpu_offload", "sequence_parallel"):
            if getattr(args, flag):
                cfg[flag] = True
        return GKDConfig.from_dict(cfg)
    except (ValueError, TypeError) as e:
        raise UserError(f"bad gkd setting: {e}") from None


def _run(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from ..model.gpt import GPUOnlyOptionError, check_runtime
    from ..utils.io import sweep_before_start
    from .gkd import STAGE_DIR, run_gkd

    cfg = _config(args)
    try:
        check_runtime(cfg.runtime())  # before any model is loaded
    except GPUOnlyOptionError as e:
        raise UserError(str(e)) from None
    sweep_before_start(Path(args.run_dir) / STAGE_DIR)
    result = run_gkd(args.run_dir, cfg, overwrite=args.overwrite)
    before, after = result.get("before") or {}, result.get("after") or {}
    if after:
        print(f"gkd: {result['steps']} steps, {result['tokens']} tokens; held-out KL {before.get('kl_div', float('nan')):.4f} "
              f"-> {after['kl_div']:.4f}, LM loss {before.get('lm_loss', float('nan')):.4f} -> {after['lm_loss']:.4f}, "
              f"top-1 agreement {before.get('top1_agreement', float('nan')):.3f} -> {after['top1_agreement']:.3f}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("gkd", help="uptrain the child to match the parent (global knowledge distillation)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run directory with parent/, child/ and data/; writes gkd/")
    p.add_argument("--config", help="YAML file of gkd settings (flat, or under a `gkd:` key)")
    for flag, (name, typ, help_) in _FLAGS.items():
        p.add_argument(flag, dest=name, type=typ, default=None, help=help_)
    p.add_argument("--pipeline-parallel", dest="pp", type=int, default=None, help=argparse.SUPPRESS)
    for flag, term in _WEIGHTS.items():
        p.add_argument(flag, dest=f"w_{term}", type=float, default=None, help=f"weight of the {term} loss term")
    p.add_argument("--shard-optimizer", action="store_true",
                   help="Megatron-Core's distributed optimizer even at DP 1 (the default when data-parallel > 1)")
    p.add_argument("--optimizer-cpu-offload", action="store_true",
                   help="keep optimizer state on the host (Megatron-Core's optimizer CPU offload; GPU runs)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron-Core sequence parallelism over the TP ranks (Transformer Engine norms: GPU only)")
    p.add_argument("--recompute", action="store_true",
                   help="recompute each layer in the backward instead of keeping its activations")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="start over even if RUN/gkd holds a finished or partial run")
    p.set_defaults(func=_run)
