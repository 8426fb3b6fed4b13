"""torchrun worker for the scoring tests: metric helpers on vocab shards, and the score stage at TP or DP 2."""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, nargs="+", required=True, help="TP sizes to run the stage at, in turn")
    ap.add_argument("--library", required=True)
    ap.add_argument("--score-dir", nargs="+", required=True, help="one score directory per TP size")
    ap.add_argument("--metrics-out", help="json file for the metric helpers' results on sharded logits (rank 0)")
    a = ap.parse_args()

    import score_common as sc
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.model import parallel
    from megatron_puzzle.model.gpt import build_model
    from megatron_puzzle.score import MetricSums, Reference, Settings, library_weights, read_space, score_space

    parallel.init_distributed(2)
    if a.metrics_out:
        g = torch.Generator().manual_seed(2)
        parent, cand = torch.randn(3, 7, 64, generator=g) * 3, torch.randn(3, 7, 64, generator=g) * 3
        targets = torch.randint(0, 64, (3, 7), generator=g)
        cand[0, 0, 40] = cand[0, 0].max() + 5  # argmax on the second shard
        sl = slice(parallel.tp_rank() * 32, (parallel.tp_rank() + 1) * 32)
        sums = MetricSums()
        sums.add(cand[..., sl], Reference.from_logits(parent[..., sl], targets))
        if torch.distributed.get_rank() == 0:
            Path(a.metrics_out).write_text(json.dumps(sums.means()))

    cfg = sc.parent_config()
    batches = sc.heldout(cfg)
    settings = Settings(tokens=sum(b[:, 1:].numel() for b in batches), seq_len=16, batch_size=2)
    for tp, score_dir in zip(a.tp, a.score_dir):
        parallel.init_distributed(tp)  # the same two processes: TP 2, or TP 1 x DP 2
        model = build_model(cfg)
        load_canonical(model, sc.parent_weights(cfg))
        score_space(model, library_weights(a.library), read_space(a.library), batches, Path(score_dir),
                  settings=settings, library_dir=Path(a.library), progress=False)
    parallel.shutdown()


if __name__ == "__main__":
    main()
