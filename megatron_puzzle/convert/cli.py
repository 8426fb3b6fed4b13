"""`megatron-puzzle import-hf` and `megatron-puzzle export-hf`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import UserError


def _import(args: argparse.Namespace) -> int:
    from .megatron_io import import_hf

    src = Path(args.hf_path)
    if not src.exists():
        raise UserError(f"{src} does not exist: give an HF model directory or a .gguf file")
    if src.is_file() and src.suffix != ".gguf":
        raise UserError(f"{src} is a file but not a .gguf; give an HF model directory or a .gguf file")
    if src.is_dir() and not (src / "config.json").exists():
        raise UserError(f"{src} has no config.json; give an HF model directory (config.json + safetensors) or a .gguf file")
    model = import_hf(src, args.out_dir, tp=args.tp, overwrite=args.overwrite)
    cfg = model.puzzle_config
    params = sum(p.numel() for p in model.parameters())
    print(f"imported {src} -> {args.out_dir}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{params / 1e6:.1f}M parameters on this rank (TP {args.tp})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..model.checkpoint import check
    from .megatron_io import export_hf

    try:
        check(args.checkpoint_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    out = export_hf(args.checkpoint_dir, args.out_dir, tp=args.tp)
    print(f"exported {args.checkpoint_dir} -> {out} (load with trust_remote_code=True)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("import-hf", help="HF Llama/DeciLM checkpoint (dir or .gguf) -> Megatron-Core checkpoint")
    p.add_argument("hf_path", help="HF model directory (config.json + safetensors) or a .gguf file")
    p.add_argument("out_dir", help="output checkpoint directory (must not exist or be empty)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (launch with torchrun --nproc-per-node TP)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=_import)

    p = sub.add_parser("export-hf", help="Megatron-Core checkpoint -> HF DeciLM / Nemotron-NAS directory")
    p.add_argument("checkpoint_dir")
    p.add_argument("out_dir", help="output HF directory (must not exist or be empty)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (launch with torchrun --nproc-per-node TP)")
    p.set_defaults(func=_export)
