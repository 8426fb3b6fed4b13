"""BLD: parent activations, loss decrease, resume after a kill, rank-count independence, library checks,
memory that does not grow with the parent's depth."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _memory import TensorBytes
from _models import REPO, built_tiny_parent, tiny_parent, torchrun
from megatron_puzzle.arch import AttentionVariant, BlockConfig, FFNVariant
from megatron_puzzle.arch.search_space import SearchSpaceConfig, configured_search_space
from megatron_puzzle.arch.shapes import random_canonical
from megatron_puzzle.init import methods
from megatron_puzzle.init.stage import run_init
from megatron_puzzle.init.variants import InitConfig
from megatron_puzzle.library import Library, LibraryError

WORKER = REPO / "tests" / "workers" / "bld_worker.py"
SPACE = SearchSpaceConfig(ffn_fractions=[1.0, 0.5], round_to=16)
BLD = dict(steps=8, batch_size=2, seq_len=16, lr=5e-4, checkpoint_every=3, eval_batches=2, progress=False)


@pytest.fixture(scope="module")
def parent(mcore):
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.model.gpt import build_model

    cfg = tiny_parent(num_layers=2)
    tensors = random_canonical(cfg, seed=1, std=0.1)
    model = build_model(cfg)
    load_canonical(model, tensors)
    model.eval()
    return model, tensors


def _tokens(cfg, n=40, seed=0):
    return torch.randint(0, cfg.vocab_size, (n, 2, 16), generator=torch.Generator().manual_seed(seed))


def _build(parent, root, bld=None, **hooks):
    from megatron_puzzle.distill.bld import BLDConfig, run_bld

    model, tensors = parent
    cfg = model.puzzle_config
    toks = _tokens(cfg)
    space = configured_search_space(cfg, SPACE)
    init = InitConfig(calib_batches=3)
    init_dir = run_init(model, tensors, root / "init", space, init, [toks[i] for i in range(3)], progress=False)
    bld = BLDConfig(**{**BLD, **(bld or {})})
    return run_bld(model, tensors, root / "library", space, bld, init, lambda s: toks[5 + s], [toks[38], toks[39]],
                   Library(init_dir), **hooks)


def _library_tensors(path):
    lib = Library(path)
    return {(i, n): lib.load(i, n) for i, n in lib.entries()}


def _assert_same(a, b, tol):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].keys() == b[key].keys(), key
        for t in a[key]:
            assert torch.allclose(a[key][t], b[key][t], atol=tol, rtol=0), (key, t)


@pytest.fixture(scope="module")
def built(parent, tmp_path_factory):
    root = tmp_path_factory.mktemp("bld")
    _build(parent, root, {"coupled_pairs": ["attn_kv1+ffn_48"]})
    return root


def test_parent_activations_reproduce_each_block(parent):
    from megatron_puzzle.convert.megatron_layout import load_block
    from megatron_puzzle.model.activations import parent_activations
    from megatron_puzzle.model.gpt import build_layer

    model, tensors = parent
    cfg = model.puzzle_config
    acts = parent_activations(model, _tokens(cfg)[0])
    for i in range(cfg.num_layers):  # the FFN alone on h_mid gives the block's output
        ffn_block = BlockConfig(AttentionVariant("no_op"), cfg.parent_block().ffn)
        layer = build_layer(cfg, ffn_block, i + 1)
        load_block(layer, cfg, i, ffn_block, tensors, subblocks=("ffn",))
        out, _ = layer(acts.h_mid[i], attention_mask=None, rotary_pos_emb=acts.rope)
        assert torch.allclose(out, acts.h_in[i + 1], atol=1e-5)


def test_linear_attention_init_equals_attention_on_one_token(parent):
    """With a single token, attention attends only to itself: the linear init must reproduce it."""
    from megatron_puzzle.convert.megatron_layout import load_block
    from megatron_puzzle.model.gpt import build_layer

    model, tensors = parent
    cfg = model.puzzle_config
    p = "model.layers.0."
    lin = dict(tensors)
    lin[p + "self_attn.linear_attn.weight"] = methods.linear_attention_from_vo(
        tensors[p + "self_attn.v_proj.weight"], tensors[p + "self_attn.o_proj.weight"], cfg.num_attention_heads, cfg.head_dim)
    outs = []
    for block, t in ((cfg.parent_block(), tensors), (BlockConfig(AttentionVariant("linear"), cfg.parent_block().ffn), lin)):
        layer = build_layer(cfg, block, 1)
        load_block(layer, cfg, 0, block, t)
        h = torch.randn(1, 3, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
        outs.append(layer(h, attention_mask=None, rotary_pos_emb=model.rotary_pos_emb(1))[0])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_bld_improves_every_trainable_variant_and_library_is_complete(built, parent):
    lib = Library(built / "library")
    lib.validate()
    assert (built / "library" / "done").exists()
    for i, name in lib.entries():
        s = lib.stats(i, name)
        if s["init"] in ("parent", "no_op"):
            assert s["final_loss"] == s["init_loss"] and s["tokens"] == 0
            if s["init"] == "parent":
                assert s["final_loss"] < 1e-10, (i, name)
        else:
            assert s["final_loss"] < s["init_loss"], (i, name, s)
            assert s["tokens"] == BLD["steps"] * BLD["batch_size"] * BLD["seq_len"]
    assert lib.pairs == [["attn_kv1+ffn_48"], ["attn_kv1+ffn_48"]]
    # a child assembled from the library holds its blocks' entries and the parent's embeddings
    cfg = parent[0].puzzle_config
    child = cfg.with_blocks([BlockConfig(AttentionVariant("linear"), cfg.parent_block().ffn),
                             BlockConfig(AttentionVariant("full", 1), FFNVariant("full", 48))])
    tensors = lib.assemble(child)
    assert torch.equal(tensors["model.embed_tokens.weight"], parent[1]["model.embed_tokens.weight"])
    assert torch.equal(tensors["model.layers.1.mlp.down_proj.weight"], lib.load(1, "attn_kv1+ffn_48")["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(tensors["model.layers.0.self_attn.linear_attn.weight"],
                       lib.load(0, "attn_linear")["model.layers.0.self_attn.linear_attn.weight"])


def test_killed_run_resumes_to_the_same_library(parent, built, tmp_path):
    from megatron_puzzle.distill.bld import Interrupted

    pairs = {"coupled_pairs": ["attn_kv1+ffn_48"]}
    with pytest.raises(Interrupted):
        _build(parent, tmp_path, pairs, stop_after_steps=4)  # partial checkpoints at step 3
    assert not (tmp_path / "library" / "done").exists()
    with pytest.raises(Interrupted):
        _build(parent, tmp_path, pairs, stop_after_entries=3)  # killed while writing entries
    report = _build(parent, tmp_path, pairs)
    assert report.entries_written < len(Library(tmp_path / "library").entries())  # finished ones were skipped
    _assert_same(_library_tensors(built / "library"), _library_tensors(tmp_path / "library"), 1e-6)


def test_corrupt_or_mismatched_entries_are_reported_by_name(built, tmp_path, parent):
    lib_dir = tmp_path / "library"
    shutil.copytree(built / "library", lib_dir)
    w = lib_dir / "layer_001" / "ffn_48" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-8:] = b"\x00" * 8
    w.write_bytes(bytes(data))
    with pytest.raises(LibraryError, match="layer_001/ffn_48"):
        Library(lib_dir).validate()
    w.write_bytes(b"garbage")
    with pytest.raises(LibraryError, match="layer_001/ffn_48"):
        Library(lib_dir).load(1, "ffn_48")
    # an entry whose tensors belong to another variant
    shutil.copy(lib_dir / "layer_001" / "ffn_96" / "weights.safetensors", w)
    with pytest.raises(LibraryError, match="layer_001/ffn_48"):
        Library(lib_dir).load(1, "ffn_48")
    # a finished library rerun with other settings is refused, not retrained
    shutil.rmtree(lib_dir)
    shutil.copytree(built / "library", lib_dir)
    shutil.copytree(built / "init", tmp_path / "init")
    with pytest.raises(LibraryError, match="layer_000/attn_kv2"):
        _build(parent, tmp_path, {"lr": 1e-2, "coupled_pairs": ["attn_kv1+ffn_48"]})


def _prepare_run(run, parent):
    from megatron_puzzle.model import checkpoint

    model, _ = parent
    checkpoint.save(model, run / "parent")
    data = run / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 2000), ("calib", 400), ("heldout", 400)):
        np.save(data / f"{split}.npy", rng.integers(0, model.puzzle_config.vocab_size, n).astype(np.uint32))
    splits = {s: {"file": f"{s}.npy"} for s in ("train", "calib", "heldout")}
    (data / "meta.json").write_text(json.dumps({"seed": 0, "splits": splits}))
    (data / "done").write_text("ok\n")
    (run / "config.yaml").write_text(
        "search_space: {ffn_fractions: [1.0, 0.5], round_to: 16, kv_heads: [2, 1], attention_no_op: false}\n"
        "init: {calib_batches: 2}\n"
        "bld: {steps: 4, batch_size: 2, seq_len: 16, lr: 0.0005, checkpoint_every: 2, eval_batches: 1}\n")


def test_library_does_not_depend_on_rank_count(parent, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for run in (one, two):
        run.mkdir()
    _prepare_run(one, parent)
    shutil.copytree(one / "parent", two / "parent")
    shutil.copytree(one / "data", two / "data")
    shutil.copy(one / "config.yaml", two / "config.yaml")
    torchrun(WORKER, 1, str(one), str(one / "config.yaml"))
    torchrun(WORKER, 2, str(two), str(two / "config.yaml"))
    _assert_same(_library_tensors(one / "library"), _library_tensors(two / "library"), 1e-5)

    # tensor parallel 2 (each variant's layer sharded over both processes, 1 KV head included)
    tp2 = tmp_path / "tp2"
    tp2.mkdir()
    for sub in ("parent", "data"):
        shutil.copytree(one / sub, tp2 / sub)
    (tp2 / "config.yaml").write_text((one / "config.yaml").read_text().replace("bld: {", "bld: {tensor_parallel: 2, "))
    torchrun(WORKER, 2, str(tp2), str(tp2 / "config.yaml"))
    _assert_same(_library_tensors(one / "library"), _library_tensors(tp2 / "library"), 1e-4)
    assert load_file(one / "library" / "non_block.safetensors").keys() == {"model.embed_tokens.weight",
                                                                          "model.norm.weight", "lm_head.weight"}


def test_tensor_bytes_counts_allocations_and_frees():
    old = torch.ones(1000)
    with TensorBytes() as tb:
        a = torch.zeros(1000)
        b = old.t() + 0  # a view of an old tensor is not an allocation; the sum is
        del a
        assert tb.live == 4000 and tb.peak == 8000
    del b


def _deep_parent(layers):
    return built_tiny_parent(layers, hidden_size=32, intermediate_size=64, vocab_size=64)


def _deep_bld(parent, root, layers_per_pass):
    from megatron_puzzle.distill.bld import BLDConfig, run_bld

    model, tensors = parent
    cfg = model.puzzle_config
    space = [["attn_kv1", "attn_linear", "ffn_32", "ffn_linear"]] * cfg.num_layers
    toks = torch.randint(0, cfg.vocab_size, (3, 2, 16), generator=torch.Generator().manual_seed(0))
    extra = {} if layers_per_pass is None else {"layers_per_pass": layers_per_pass}
    bld = BLDConfig(steps=1, batch_size=2, seq_len=16, checkpoint_every=10, eval_batches=1, progress=False, **extra)
    init = InitConfig(ffn_prune="truncate", ffn_linear="up_down")  # no calibration statistics needed
    run_bld(model, tensors, root, space, bld, init, lambda s: toks[s], [toks[2]], None)


def test_bld_peak_memory_does_not_grow_with_depth(mcore, tmp_path):
    """The parent grows 4 -> 8 -> 16 layers; BLD's own peak tensor bytes (entries, optimizer states,
    activations) stay flat. (Keeping every layer's inputs and every entry alive at once, as BLD did
    before passes, measured 0.84 / 1.59 / 3.12 MB here.)"""
    peaks = {}
    for layers in (4, 8, 16):
        parent = _deep_parent(layers)
        with TensorBytes() as tb:
            _deep_bld(parent, tmp_path / f"lib{layers}", layers_per_pass=4)
        peaks[layers] = tb.peak
        assert Library(tmp_path / f"lib{layers}").validate() is None
    print("BLD peak tensor bytes by parent depth:", peaks)
    one_entry = 4 * (32 * 64 * 3)  # the smallest trained entry's own weights alone
    assert peaks[4] > 4 * one_entry, peaks
    assert max(peaks.values()) <= 1.1 * peaks[4], peaks
    # passes change what is alive at once, not what is trained
    _deep_bld(_deep_parent(8), tmp_path / "one_pass", layers_per_pass=0)
    _assert_same(_library_tensors(tmp_path / "lib8"), _library_tensors(tmp_path / "one_pass"), 1e-6)


def test_schedule_balances_cost_within_the_lpt_bound_of_brute_force():
    import itertools

    from megatron_puzzle.distill.bld import Entry, passes, schedule

    rng = np.random.default_rng(3)
    for trial in range(20):
        costs = [int(c) for c in rng.integers(0, 100, size=9)]
        entries = [Entry(k // 3, f"v{k}", "ffn", None, "m", c > 0, c) for k, c in enumerate(costs)]
        groups = schedule(entries, 2)
        assert sorted(id(e) for g in groups for e in g) == sorted(id(e) for e in entries)
        worst = max(sum(e.cost for e in g) for g in groups)
        best = min(max(sum(c for c, s in zip(costs, side) if s == g) for g in (0, 1))
                   for side in itertools.product((0, 1), repeat=len(costs)))
        assert worst <= (4 / 3 - 1 / 6) * best + 1e-9, (costs, worst, best)
        assert schedule(entries, 2) == groups  # deterministic
    layered = [Entry(i, "x", "ffn", None, "m", True, 1) for i in (0, 0, 1, 2, 3, 3, 4)]
    assert [[e.layer for e in p] for p in passes(layered, 2)] == [[0, 0, 1], [2, 3, 3], [4]]
    assert len(passes(layered, 0)) == 1


def test_bld_with_a_bf16_parent_trains_fp32_entries_like_an_fp32_parent(mcore, tmp_path):
    """bld.dtype bfloat16 (the GPU default): the parent held in bf16, entries with fp32 weights under
    autocast; their final losses agree with an fp32 parent's run to 2% and the library stays fp32."""
    from megatron_puzzle.distill.bld import BLDConfig, run_bld

    assert BLDConfig().torch_dtype() == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    with pytest.raises(ValueError, match="bld.dtype must be auto, float32 or bfloat16"):
        BLDConfig(dtype="fp16")
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tensors = _deep_parent(2)
        model.to(dtype)
        cfg = model.puzzle_config
        toks = torch.randint(0, cfg.vocab_size, (8, 2, 16), generator=torch.Generator().manual_seed(0))
        space = [["attn_kv1", "attn_linear", "ffn_32", "ffn_linear"]] * cfg.num_layers
        bld = BLDConfig(steps=6, batch_size=2, seq_len=16, lr=1e-3, checkpoint_every=100, eval_batches=1,
                        progress=False)
        root = tmp_path / str(dtype)
        run_bld(model, tensors, root, space, bld, InitConfig(ffn_prune="truncate", ffn_linear="up_down"),
                lambda s: toks[s], [toks[7]], None)
        lib = Library(root)
        losses[dtype] = {(i, n): json.loads((root / f"layer_{i:03d}" / n / "stats.json").read_text())["final_loss"]
                         for i, n in lib.entries()}
        assert all(t.dtype == torch.float32 for e in _library_tensors(root).values() for t in e.values())
    for k, ref in losses[torch.float32].items():
        assert losses[torch.bfloat16][k] == pytest.approx(ref, rel=0.02), k


STOP_WORKER = REPO / "tests" / "workers" / "bld_stop_worker.py"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pp2_library_equals_pp1(mcore, tmp_path, dtype):
    """BLD with a 3-layer parent split over 2 pipeline stages (layers 0 | 1-2, torchrun 2 processes,
    one layer per pass: the first stage joins the second's second pass with no entries; init first
    at PP 1 in the same launch), killed and resumed, writes the library one process writes: every
    entry's weights to round-off, and the same stats. With bld.dtype bfloat16 (the GPU default) the
    stages hold the parent and hand on hidden states in bf16; the entries stay fp32."""
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.distill.bld_run import build_library
    from megatron_puzzle.model.gpt import build_model
    from megatron_puzzle.model.parallel import init_distributed

    init_distributed(tensor_parallel=1)  # a CLI test before may have shut this process's group down
    cfg = tiny_parent(num_layers=3)
    model = build_model(cfg)
    load_canonical(model, random_canonical(cfg, seed=2, std=0.1))
    one, two = tmp_path / "one", tmp_path / "two"
    for run in (one, two):
        run.mkdir()
    _prepare_run(one, (model, None))
    (one / "config.yaml").write_text((one / "config.yaml").read_text().replace("bld: {", f"bld: {{layers_per_pass: 1, dtype: {dtype}, "))
    for sub in ("parent", "data"):
        shutil.copytree(one / sub, two / sub)
    shutil.copy(one / "config.yaml", two / "config.yaml")
    build_library(one, one / "config.yaml")
    # stopped after 3 steps (partial checkpoints after 2), then finished by the CLI at the same layout
    torchrun(STOP_WORKER, 2, str(two), str(two / "config.yaml"), "3", "--pp", "2", "--pp-first-stage-layers", "1")
    assert (two / "library" / "done").exists()
    a, b = _library_tensors(one / "library"), _library_tensors(two / "library")
    assert {layer for layer, _ in a} == {0, 1, 2}  # entries of both stages
    _assert_same(a, b, 1e-5)
    assert all(t.dtype == torch.float32 for e in b.values() for t in e.values())
    for (layer, name) in a:
        sa, sb = (json.loads((r / "library" / f"layer_{layer:03d}" / name / "stats.json").read_text()) for r in (one, two))
        assert sa["steps"] == sb["steps"] and sa["settings"] == sb["settings"]
        assert sb["final_loss"] == pytest.approx(sa["final_loss"], rel=1e-4, abs=1e-7), (layer, name)
        assert sb["init_loss"] == pytest.approx(sa["init_loss"], rel=1e-4, abs=1e-7), (layer, name)
    nb = [load_file(r / "library" / "non_block.safetensors") for r in (one, two)]
    assert nb[0].keys() == nb[1].keys() and all(torch.equal(nb[0][k], nb[1][k]) for k in nb[0])


def test_bld_refuses_layouts_the_parent_cannot_take(parent, tmp_path, capsys):
    from megatron_puzzle.cli import main

    _prepare_run(tmp_path, parent)
    for argv, words in ((["--pp", "3"], "PP 3 exceeds the parent's 2 layers"),
                        (["--pipeline-parallel", "2"], "1 processes are not a multiple of TP x PP = 1 x 2")):
        assert main(["bld", "--run-dir", str(tmp_path), "--no-progress", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "init").exists() and not (tmp_path / "library").exists()
