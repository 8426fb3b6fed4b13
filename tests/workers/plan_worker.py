"""The plan of one stage step on fake tensors, then the same step on real tensors measured by the allocator.

    python tests/workers/plan_worker.py STAGE [STAGE...]   -> one JSON line {stage: [planned, measured]}

A small Llama-shaped model (4 layers, hidden 256), one process: fake world first, torn down, then a real gloo world.
"""

import json
import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def main():
    from megatron_puzzle.arch import ModelConfig
    from megatron_puzzle.arch.block_config import AttentionVariant, BlockConfig, FFNVariant
    from megatron_puzzle.model import parallel
    from megatron_puzzle.plan import real, stages
    from megatron_puzzle.plan.fake import fake_world

    cfg = ModelConfig(vocab_size=2048, hidden_size=256, num_layers=4, num_attention_heads=8, num_kv_heads=4,
                      intermediate_size=768)
    entries = ((BlockConfig(AttentionVariant(num_kv_heads=1), cfg.parent_block().ffn), ("attention",)),
               (BlockConfig(AttentionVariant("no_op"), FFNVariant(intermediate_size=384)), ("ffn",)))
    s = stages.StageSettings(micro_batch_size=2, seq_len=64, num_microbatches=2, dtype=torch.bfloat16,
                             teacher_dtype=torch.bfloat16, variants=entries)
    out = {}
    for stage in sys.argv[1:]:
        with fake_world(world_size=1, tensor_parallel=1):
            out[stage] = [stages.plan_stage(stage, cfg, s).peak_bytes]
    parallel.init_distributed(1)
    for stage in sys.argv[1:]:
        out[stage].append(real.measure_stage(stage, cfg, s))
    parallel.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
