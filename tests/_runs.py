"""A tiny run directory built with the real stage APIs, shared by the report and realize tests."""

import numpy as np
import torch

from _models import tiny_parent
from megatron_puzzle.arch import AttentionVariant as A, BlockConfig, FFNVariant as F


def make_tiny_run(run):
    """parent, data, library (init weights), child, fake scores/costs and the search's constraints."""
    from megatron_puzzle.arch.search_space import configured_search_space
    from megatron_puzzle.arch.shapes import random_canonical
    from megatron_puzzle.convert.megatron_layout import canonical_state, load_canonical
    from megatron_puzzle.cost.memory import subblock_params
    from megatron_puzzle.init.stage import run_init
    from megatron_puzzle.init.variants import InitConfig
    from megatron_puzzle.library import Library
    from megatron_puzzle.model import checkpoint
    from megatron_puzzle.model.gpt import build_model
    from megatron_puzzle.utils.io import atomic_write_json

    cfg = tiny_parent(num_layers=4)
    parent = build_model(cfg)
    load_canonical(parent, random_canonical(cfg, seed=0, std=0.15))
    checkpoint.save(parent, run / "parent")
    data = run / "data"
    data.mkdir(parents=True)
    g = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 4096), ("calib", 1024), ("heldout", 1024)):
        np.save(data / f"{split}.npy", g.integers(0, cfg.vocab_size, n, dtype=np.uint32))
        splits[split] = {"file": f"{split}.npy", "tokens": n}
    atomic_write_json(data / "meta.json", {"seed": 0, "vocab_size": cfg.vocab_size, "splits": splits})
    (data / "done").write_text("ok\n")
    space = configured_search_space(cfg, {"ffn_fractions": [1.0, 0.5], "round_to": 16})
    calib = [torch.from_numpy(np.load(data / "calib.npy")[:256].astype(np.int64)).view(4, 64)]
    run_init(parent, canonical_state(parent), run / "library", space, InitConfig(), calib, progress=False)

    child = cfg.with_blocks([cfg.parent_block(), BlockConfig(A("full", 1), F("full", 48)),
                             BlockConfig(A("no_op"), F("full", 48)), BlockConfig(A("full", 1), F("linear"))])
    model = build_model(child)
    load_canonical(model, Library(run / "library").assemble(child))
    checkpoint.save(model, run / "child")

    names = space[0]
    cost = lambda n: {"params": subblock_params(cfg, n), "weight_bytes": 4 * subblock_params(cfg, n),  # noqa: E731
                      "kv_cache_bytes": 0, "prefill_time_s": 1e-9 * subblock_params(cfg, n),
                      "decode_time_s": 1e-9 * subblock_params(cfg, n)}
    scenario = {"name": "tiny", "batch_size": 2, "prefill_len": 16, "decode_len": 8, "weight_dtype": "float32",
                "kv_dtype": "float32", "device": "cpu"}
    atomic_write_json(run / "measure" / "costs.json", {
        "scenario": scenario, "source": "file", "device": {},
        "non_block": {"params": 0, "weight_bytes": 0, "kv_cache_bytes": 0, "prefill_time_s": 1e-6,
                      "decode_time_s": 1e-6}, "layers": [{n: cost(n) for n in names} for _ in range(4)]})
    score = lambda n: {"kl_div": 1.0 / (1 + subblock_params(cfg, n)), "lm_loss": 5.0, "top1_agreement": 0.5}  # noqa: E731
    atomic_write_json(run / "score" / "scores.json", {
        "metrics": ["kl_div", "lm_loss", "top1_agreement"], "tokens": 0,
        "parent": {"kl_div": 0.0, "lm_loss": 5.0, "top1_agreement": 1.0},
        "layers": [{n: score(n) for n in names} for _ in range(4)]})
    atomic_write_json(run / "search" / "solutions.json", {"constraints": ["throughput>=1.3x"], "solutions": []})
    return cfg
