"""torchrun worker for the tensor-parallel tests: logits and checkpoints at a given TP size."""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--config", required=True, help="model_config.json")
    ap.add_argument("--weights", help="canonical safetensors to load")
    ap.add_argument("--load-ckpt", help="distributed checkpoint to load instead of --weights")
    ap.add_argument("--save-ckpt")
    ap.add_argument("--tokens", required=True, help="json list of token lists")
    ap.add_argument("--out", required=True, help="safetensors file for the full logits (rank 0)")
    a = ap.parse_args()

    from safetensors.torch import load_file, save_file

    from megatron_puzzle.arch import ModelConfig
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.model import checkpoint, forward
    from megatron_puzzle.model.gpt import build_model
    from megatron_puzzle.model.parallel import init_distributed, shutdown

    init_distributed(a.tp)
    cfg = ModelConfig.load(a.config)
    model = build_model(cfg)
    if a.load_ckpt:
        checkpoint.load_into(model, a.load_ckpt)
    else:
        load_canonical(model, load_file(a.weights))
    if a.save_ckpt:
        checkpoint.save(model, a.save_ckpt)
    tokens = torch.tensor(json.loads(Path(a.tokens).read_text()))
    with torch.no_grad():
        logits = forward.full_logits(model, tokens)
    if torch.distributed.get_rank() == 0:
        save_file({"logits": logits.contiguous()}, a.out)
    shutdown()


if __name__ == "__main__":
    main()
