"""torchrun worker: `OUT` — a tied-embedding child built at PP 2 (layers 0-1 | 2-5), loaded layer by layer with
`load_layers` (each stage its own layers), saved as one checkpoint to OUT/ckpt; the last stage writes the logits
of one batch run through the stages to OUT/logits.pt."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    import torch

    torch.set_num_threads(1)
    from _models import every_variant_child
    from megatron_puzzle.arch.shapes import random_canonical
    from megatron_puzzle.convert.megatron_layout import load_layers
    from megatron_puzzle.model import checkpoint
    from megatron_puzzle.model.gpt import RuntimeOptions, build_model
    from megatron_puzzle.model.parallel import init_distributed, shutdown
    from megatron_puzzle.model.pipe import PipeStage
    from megatron_puzzle.score.evaluate import _stage_logits

    out = Path(sys.argv[1])
    cfg = every_variant_child(tie=True)
    tensors = random_canonical(cfg, seed=0, std=0.15)
    init_distributed(1, pipeline_parallel=2)
    model = build_model(cfg, RuntimeOptions(first_stage_layers=2))
    asked = []
    load_layers(model, lambda: dict((k, v) for k, v in tensors.items() if not k.startswith("model.layers.")),
                lambda i: asked.append(i) or {k: v for k, v in tensors.items() if k.startswith(f"model.layers.{i}.")})
    stage = PipeStage(model)
    assert asked == list(stage.layers), (asked, stage.layers)  # each stage reads only its own layers
    checkpoint.save(model, out / "ckpt")
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = _stage_logits(stage, tokens)
    if stage.is_last:
        torch.save(logits, out / "logits.pt")
    shutdown()


if __name__ == "__main__":
    main()
