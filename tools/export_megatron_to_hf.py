#!/usr/bin/env python
"""Megatron-Core checkpoint (parent, realized child or GKD output) -> HF DeciLM / Nemotron-NAS directory.

Usable without the rest of the pipeline. Writes config.json (`model_type: nemotron-nas`,
`block_configs`), safetensors weights named as published Nemotron-NAS checkpoints, the modeling code
(load with `trust_remote_code=True`) and the tokenizer saved beside the checkpoint.

    python tools/export_megatron_to_hf.py CHECKPOINT_DIR OUT_DIR [--dtype bfloat16]
    torchrun --nproc-per-node 8 tools/export_megatron_to_hf.py CHECKPOINT_DIR OUT_DIR --tp 8
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint_dir", type=Path, help="a megatron-puzzle checkpoint (model_config.json + done)")
    ap.add_argument("out_dir", type=Path, help="output HF directory (must not exist or be empty)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load at; launch that many processes")
    ap.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from megatron_puzzle.convert.megatron_io import export_hf
    from megatron_puzzle.model.parallel import shutdown

    try:
        export_hf(a.checkpoint_dir, a.out_dir, tp=a.tp, dtype=getattr(torch, a.dtype))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    print(f"wrote {a.out_dir} (load with trust_remote_code=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
