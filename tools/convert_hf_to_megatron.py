#!/usr/bin/env python
"""HF checkpoint (Llama family or DeciLM / Nemotron-NAS, safetensors directory or .gguf) -> Megatron-Core checkpoint.

Usable without the rest of the pipeline. The result is a Megatron-Core distributed checkpoint
(+ model_config.json, tokenizer/, done) that loads at any tensor-parallel size.

    python tools/convert_hf_to_megatron.py HF_PATH OUT_DIR                    # one process
    torchrun --nproc-per-node 8 tools/convert_hf_to_megatron.py HF_PATH OUT_DIR --tp 8
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_path", type=Path, help="HF model directory (config.json + safetensors) or a .gguf file")
    ap.add_argument("out_dir", type=Path, help="output checkpoint directory (must not exist or be empty)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size; launch that many processes with torchrun")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if not a.hf_path.exists():
        ap.error(f"{a.hf_path} does not exist: give an HF model directory or a .gguf file")
    from megatron_puzzle.convert.megatron_io import import_hf
    from megatron_puzzle.model.parallel import shutdown

    try:
        import_hf(a.hf_path, a.out_dir, tp=a.tp, overwrite=a.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    print(f"wrote {a.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
