"""torchrun worker for the bf16 TP parity check on GPUs: full logits of a model at a TP size.

Local specs load canonical weights directly; TE specs (--te) go through a checkpoint written by a
local-spec model, as the pipeline does (`--ckpt-dir`).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--config", required=True, help="model_config.json")
    ap.add_argument("--weights", required=True, help="canonical safetensors")
    ap.add_argument("--tokens", required=True, help="torch file of a [batch, seq] token tensor")
    ap.add_argument("--out", required=True, help="safetensors file for the full logits (rank 0)")
    ap.add_argument("--te", action="store_true", help="Transformer Engine specs, loaded from a checkpoint")
    ap.add_argument("--ckpt-dir", help="where the local-spec checkpoint for --te is written")
    a = ap.parse_args()

    from safetensors.torch import load_file, save_file

    from megatron_puzzle.arch import ModelConfig
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.model import checkpoint, forward
    from megatron_puzzle.model.gpt import RuntimeOptions, build_model
    from megatron_puzzle.model.parallel import init_distributed, shutdown

    init_distributed(a.tp)
    cfg = ModelConfig.load(a.config)
    model = build_model(cfg, RuntimeOptions(dtype=torch.bfloat16))
    load_canonical(model, load_file(a.weights))
    if a.te:
        checkpoint.save(model, a.ckpt_dir)
        model = checkpoint.load(a.ckpt_dir, RuntimeOptions(dtype=torch.bfloat16, use_te=True))
    tokens = torch.load(a.tokens, weights_only=True).cuda()
    with torch.no_grad():
        logits = forward.full_logits(model, tokens)
    if torch.distributed.get_rank() == 0:
        save_file({"logits": logits.float().cpu().contiguous()}, a.out)
    shutdown()


if __name__ == "__main__":
    main()
