"""No whole-model copies: the report's runtime models, scoring's child and the baselines' weights are made
one layer at a time from a Megatron model, so the tensor bytes they hold beyond their result stay at about
one layer however deep the model is."""

import math

import torch

from _memory import TensorBytes
from _models import built_tiny_parent
from megatron_puzzle.arch import AttentionVariant as A, BlockConfig, FFNVariant as F
from megatron_puzzle.arch.shapes import canonical_shapes, variant_shapes


def _parent(layers):
    return built_tiny_parent(layers, vocab_size=64, hidden_size=64, intermediate_size=256)


def _bytes(cfg, prefix=""):
    return sum(math.prod(s) * 4 for n, s in canonical_shapes(cfg).items() if n.startswith(prefix))


def _transient(fn):
    """(fn's result, the peak bytes of tensors fn allocated beyond those still alive when it returns)."""
    with TensorBytes() as tb:
        out = fn()
    return out, tb.peak - tb.live


def test_report_runtime_model_copies_one_layer_at_a_time(mcore):
    from megatron_puzzle.convert.megatron_layout import canonical_state
    from megatron_puzzle.report.make import canonical_of
    from megatron_puzzle.cost.decilm_runtime import runtime_model

    extra, whole = {}, {}
    for layers in (4, 16):
        model, w = _parent(layers)
        rt, extra[layers] = _transient(lambda: runtime_model(*canonical_of(model)))
        sd = rt.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in w.items())  # the source tensors, not the layout code's
        del rt
        # the whole-copy path the report took before: the same measure sees the model
        _, whole[layers] = _transient(lambda: runtime_model(model.puzzle_config, canonical_state(model)))
    cfg = model.puzzle_config
    layer = _bytes(cfg, "model.layers.0.")
    print("runtime model, transient bytes by depth:", extra, "whole copy:", whole, "one layer:", layer)
    assert extra[16] <= 1.1 * extra[4] and extra[16] <= 1.5 * layer
    assert whole[16] >= 0.9 * _bytes(cfg) > 8 * layer


def test_scoring_builds_its_child_one_layer_at_a_time(mcore):
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.model.gpt import build_model
    from megatron_puzzle.score.evaluate import assemble, build_child

    extra = {}
    for layers in (4, 16):
        model, w = _parent(layers)
        cfg = model.puzzle_config
        changed = (A("full", 1), F("full", 128))
        child_cfg = cfg.with_blocks([BlockConfig(*changed) if i % 2 else cfg.blocks[i] for i in range(layers)])
        gen = torch.Generator().manual_seed(layers)
        lib = {(i, v.name): {k: torch.randn(s, generator=gen) for k, s in variant_shapes(cfg, i, v).items()}
               for i in range(1, layers, 2) for v in changed}
        vw = lambda i, name: lib.get((i, name))  # noqa: E731  (None: the parent's own variant)
        child, extra[layers] = _transient(lambda: build_child(model, child_cfg, vw))
        ref = build_model(child_cfg)
        load_canonical(ref, assemble(cfg, w, child_cfg, vw))  # the whole-copy reference
        got, want = dict(child.named_parameters()), dict(ref.named_parameters())
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        del child, ref
    layer = _bytes(cfg, "model.layers.0.")
    print("child build, transient bytes by depth:", extra, "one parent layer:", layer)
    # the parent's layer as canonical tensors, then as this rank's Megatron tensors (qkv interleaved)
    assert extra[16] <= 1.1 * extra[4] and extra[16] <= 2 * layer


def test_baseline_weights_come_layer_by_layer_from_their_sources(mcore):
    from megatron_puzzle.convert.megatron_layout import CanonicalView
    from megatron_puzzle.init.variants import InitConfig, init_variant
    from megatron_puzzle.report.baselines import BaselineWeights

    model, w = _parent(4)
    cfg = model.puzzle_config
    own = cfg.parent_block()
    kv1 = A("full", 1)
    blocks = [own, BlockConfig(kv1, F("no_op")), BlockConfig(A("linear"), own.ffn), BlockConfig(kv1, own.ffn)]
    entry = {k: torch.randn(s) for k, s in variant_shapes(cfg, 1, kv1).items()}

    class Lib:  # holds only layer 1's attn_kv1
        def has(self, i, name):
            return (i, name) == (1, kv1.name)

        def load(self, i, name):
            return entry

    bw = BaselineWeights(cfg, blocks, Lib(), CanonicalView(model))
    assert bw.sources == {"parent": 4, "library": 1, "no_op": 1, "init": 2}
    want = {k: w[k] for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
    want.update({k: v for k, v in w.items() if k.startswith("model.layers.0.")})
    want.update(entry)
    want.update(init_variant(cfg, w, 2, A("linear"), InitConfig())[0])
    want.update({k: w[k] for k in variant_shapes(cfg, 2, own.ffn)})
    want.update(init_variant(cfg, w, 3, kv1, InitConfig())[0])
    want.update({k: w[k] for k in variant_shapes(cfg, 3, own.ffn)})
    got = bw.tensors()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
