"""`megatron-puzzle run` (the whole pipeline) and `megatron-puzzle realize`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import UserError, add_pipeline_arguments


def _run(args: argparse.Namespace) -> int:
    from . import config as run_config
    from .run import run_pipeline, summary

    try:
        profile = chosen_profile(args)
        cfg = run_config.load(args.config, profile=profile)
    except run_config.ConfigError as e:
        raise UserError(str(e)) from None
    run_dir = Path(args.run_dir or f"runs/{profile}")
    run_pipeline(run_dir, cfg, from_stage=args.from_stage, until=args.until)  # input errors: one line, by main
    from ..model.parallel import is_rank0

    if is_rank0():
        print(summary(run_dir))
    return 0


def chosen_profile(args: argparse.Namespace) -> str:
    if args.quick and args.profile not in (None, "quick"):
        raise UserError(f"--quick and --profile {args.profile} ask for two profiles; give one")
    return "quick" if args.quick else (args.profile or "default")


def _realize(args: argparse.Namespace) -> int:
    from .realize import RealizeConfig, run_realize

    r = run_realize(args.run_dir, RealizeConfig(
        solution=args.solution, force=args.force, evaluate=args.eval_tokens > 0, eval_tokens=args.eval_tokens,
        seq_len=args.seq_len, batch_size=args.batch_size, tensor_parallel=args.tensor_parallel,
        pipeline_parallel=args.pipeline_parallel, pp_first_stage_layers=args.pp_first_stage_layers,
        pp_last_stage_layers=args.pp_last_stage_layers))
    m = r.get("measured", {})
    print(f"realized solution {args.solution} into {Path(args.run_dir) / 'child'}"
          + (f"; measured throughput {m['throughput']:.1f} tok/s ({m['speedup']:.2f}x the parent), decode "
             f"{m['decode_throughput']:.1f} tok/s ({m['decode_speedup']:.2f}x)" if m else ""))
    if args.export_hf:
        # the child before GKD, for serving or inspection; the pipeline's export stage writes the uptrained one
        from ..convert.megatron_io import export_hf

        if Path(args.export_hf).exists() and any(Path(args.export_hf).iterdir()):
            raise UserError(f"{args.export_hf} already exists and is not empty; choose another directory")
        export_hf(Path(args.run_dir) / "child", args.export_hf, tp=args.tensor_parallel)  # whole child, PP 1
        print(f"exported the child to {args.export_hf} (HF DeciLM, load with trust_remote_code=True)")
    return 0


def register(sub) -> None:
    from .config import PROFILES, STAGES

    p = sub.add_parser("run", help="the whole pipeline: parent -> faster child, with a report",
                       description="Run import -> data -> init -> bld -> score -> measure -> search -> realize -> "
                                   "gkd -> export -> eval over one run directory. Finished stages are skipped, so a "
                                   "killed run resumes with the same command.")
    p.add_argument("--config", help="YAML run config (see examples/configs/); default: the built-in default run")
    p.add_argument("--run-dir", help="run directory (default: runs/PROFILE, e.g. runs/default)")
    p.add_argument("--profile", choices=list(PROFILES), help="default: the 30-minute CPU run; quick: every stage "
                   "on a 4-layer cut in a few minutes; long: the default run with the GKD budget that reaches "
                   "the accuracy goal")
    p.add_argument("--quick", action="store_true", help="the same as --profile quick")
    p.add_argument("--from", dest="from_stage", choices=STAGES, help="redo this stage and every later one "
                   "(earlier outputs are moved to RUN/previous/, not deleted)")
    p.add_argument("--until", choices=STAGES, help="stop after this stage")
    p.set_defaults(func=_run)

    p = sub.add_parser("realize", help="assemble a searched child from the block library into RUN/child")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--solution", type=int, default=0, help="which solution of RUN/search/solutions.json")
    p.add_argument("--force", action="store_true", help="realize again even if RUN/child exists")
    p.add_argument("--export-hf", metavar="DIR", help="also write the child as an HF DeciLM directory")
    p.add_argument("--eval-tokens", type=int, default=4096,
                   help="held-out tokens the child is scored on against the parent (default 4096; 0 skips)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per held-out sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="held-out sequences per batch (default 8)")
    p.add_argument("--tensor-parallel", type=int, default=1, help="tensor-parallel size (launch with torchrun)")
    add_pipeline_arguments(p, "each stage builds and writes its layers of the child")
    p.set_defaults(func=_realize)
