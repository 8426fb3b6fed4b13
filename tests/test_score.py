"""Replace-1-block scoring: against a direct full forward of the replaced model, float64 metric
references, tensor parallelism, the on-disk cache and the scores.json format."""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from _models import REPO, torchrun

sys.path.insert(0, str(REPO / "tests" / "workers"))
import score_common as sc  # noqa: E402

from megatron_puzzle.score import (  # noqa: E402
    ALL_METRICS, MetricSums, Reference, ReplaceScorer, Settings, assemble, entries_of, library_weights, read_space,
    score_space, split_batch,
)

WORKER = REPO / "tests" / "workers" / "score_worker.py"


def reference_metrics(parent_logits, cand_logits, targets):
    """Float64, full-vocabulary token means."""
    lp = F.log_softmax(parent_logits.double(), -1)
    lq = F.log_softmax(cand_logits.double(), -1)
    return {
        "kl_div": (lp.exp() * (lp - lq)).sum(-1).mean().item(),
        "lm_loss": F.cross_entropy(cand_logits.double().flatten(0, 1), targets.flatten()).item(),
        "top1_agreement": (cand_logits.argmax(-1) == parent_logits.argmax(-1)).double().mean().item(),
        "accuracy": (cand_logits.argmax(-1) == targets).double().mean().item(),
    }


def random_logits(seed=2, vocab=64):
    g = torch.Generator().manual_seed(seed)
    parent, cand = torch.randn(3, 7, vocab, generator=g) * 3, torch.randn(3, 7, vocab, generator=g) * 3
    targets = torch.randint(0, vocab, (3, 7), generator=g)
    cand[0, 0, 40] = cand[0, 0].max() + 5
    return parent, cand, targets


def test_metrics_match_float64_references():
    parent, cand, targets = random_logits()
    sums = MetricSums()
    # two batches of one position-set each: the means are token-weighted
    sums.add(cand[:1], Reference.from_logits(parent[:1], targets[:1]))
    sums.add(cand[1:], Reference.from_logits(parent[1:], targets[1:]))
    got, want = sums.means(), reference_metrics(parent, cand, targets)
    assert sums.tokens == targets.numel()
    for m in ALL_METRICS:
        assert got[m] == pytest.approx(want[m], abs=1e-6), m
    same = MetricSums()
    same.add(parent, Reference.from_logits(parent, targets))
    assert abs(same.means()["kl_div"]) < 1e-7 and same.means()["top1_agreement"] == 1.0


@pytest.fixture(scope="module")
def tiny(mcore):
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.model.gpt import build_model

    cfg = sc.parent_config()
    tensors = sc.parent_weights(cfg)
    model = build_model(cfg)
    load_canonical(model, tensors)
    return cfg, tensors, model, sc.heldout(cfg)


def _weights_fn(cfg, tensors, calls=None):
    seeds = {(layer, n): 100 * layer + j for layer, names in enumerate(sc.SPACE) for j, n in enumerate(names)}

    def variant_weights(layer, name):
        if calls is not None:
            calls.append((layer, name))
        return sc.variant_weights_for(cfg, tensors, layer, name, seeds.get((layer, name), 7))

    return variant_weights


def test_replaced_block_equals_full_forward_of_replaced_model(tiny):
    """Scores from cached parent inputs equal a whole GPTModel built with the replaced block."""
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.model.gpt import build_model

    cfg, tensors, parent, batches = tiny
    vw = _weights_fn(cfg, tensors)
    items = [(0, "attn_kv1"), (0, "attn_linear"), (0, "ffn_48"), (1, "attn_no_op"), (1, "ffn_linear"),
             (2, "attn_kv4"), (2, "ffn_no_op"), (1, "attn_kv1+ffn_32")]
    scorer = ReplaceScorer(parent, vw, max_entries=3)  # several groups: several parent passes
    scores, parent_m = scorer.score(items, batches, progress=False)
    tokens = [split_batch(b)[0] for b in batches]
    targets = torch.cat([split_batch(b)[1] for b in batches])
    with torch.no_grad():
        inputs, rope, _, _ = scorer.parent_pass(*split_batch(batches[0]))
        parent_logits = torch.cat([parent(input_ids=t, position_ids=None, attention_mask=None) for t in tokens])
        for layer, name in items:
            child_cfg = sc.child_with(cfg, layer, name)
            child = build_model(child_cfg)
            load_canonical(child, assemble(cfg, tensors, child_cfg, vw))
            direct = [child(input_ids=t, position_ids=None, attention_mask=None) for t in tokens]  # GPTModel.forward
            mine = scorer.entry_logits(layer, scorer.build_entry(layer, name), inputs, rope)
            assert (mine - direct[0]).abs().max().item() < 1e-5, (layer, name)
            want = reference_metrics(parent_logits, torch.cat(direct), targets)
            for m in ALL_METRICS:
                assert scores[(layer, name)][m] == pytest.approx(want[m], abs=1e-5), (layer, name, m)
            assert scores[(layer, name)]["kl_div"] > 1e-4  # a real replacement moves the distribution
    assert parent_m["kl_div"] == pytest.approx(0.0, abs=1e-7) and parent_m["top1_agreement"] == 1.0


def test_parents_own_variant_is_not_rerun(tiny):
    cfg, tensors, parent, batches = tiny
    scorer = ReplaceScorer(parent, _weights_fn(cfg, tensors))
    assert scorer.build_entry(0, "attn_kv2") is None and scorer.build_entry(2, "ffn_96") is None
    scores, parent_m = scorer.score([(0, "attn_kv2"), (0, "ffn_96")], batches, progress=False)
    assert scores[(0, "attn_kv2")] == parent_m


def test_bad_variant_weights_name_the_entry(tiny):
    cfg, tensors, parent, _ = tiny
    scorer = ReplaceScorer(parent, lambda layer, name: {})
    with pytest.raises(ValueError, match="layer 1 variant attn_kv1"):
        scorer.build_entry(1, "attn_kv1")


def test_cache_skips_scored_items_and_scores_json_format(tiny, tmp_path, monkeypatch):
    cfg, tensors, parent, batches = tiny
    calls, runs = [], []
    real = ReplaceScorer.entry_logits
    monkeypatch.setattr(ReplaceScorer, "entry_logits",
                        lambda self, layer, *a: runs.append(layer) or real(self, layer, *a))
    settings = Settings(tokens=sum(b[:, 1:].numel() for b in batches), seq_len=16, batch_size=2)

    def go(settings=settings, batches=batches, **kw):
        return score_space(parent, _weights_fn(cfg, tensors, calls), sc.SPACE, batches, tmp_path / "score",
                         settings=settings, progress=False, **kw)

    first = go()
    n_items = len(entries_of(sc.SPACE))
    assert len(runs) == (n_items - 3) * len(batches)  # three items are the parent's own blocks
    calls.clear(), runs.clear()
    second = go()
    assert calls == [] and runs == []  # everything came from the cache
    assert second == first

    on_disk = json.loads((tmp_path / "score" / "scores.json").read_text())
    assert (tmp_path / "score" / "done").exists()
    assert on_disk == first
    assert list(on_disk) == ["metrics", "parent", "tokens", "layers"]
    assert on_disk["metrics"] == ["kl_div", "lm_loss", "top1_agreement"]
    assert on_disk["tokens"] == 2 * 2 * 16
    assert [sorted(layer) for layer in on_disk["layers"]] == [sorted(names) for names in sc.SPACE]
    assert on_disk["parent"]["kl_div"] == pytest.approx(0.0, abs=1e-7)
    assert on_disk["layers"][0]["attn_kv2"] == on_disk["parent"]
    for layer in on_disk["layers"]:
        for m in layer.values():
            assert set(m) == {"kl_div", "lm_loss", "top1_agreement"} and all(math.isfinite(x) for x in m.values())

    # a lost cache entry is scored again alone; fewer metrics come from the cache
    (tmp_path / "score" / "cache" / "layer_001__ffn_32.json").unlink()
    third = go()
    assert sorted(set(calls)) == [(1, "ffn_32")] and third == first
    calls.clear()
    kl_only = go(metrics=["kl_div"])
    assert calls == [] and kl_only["layers"][1]["ffn_32"] == {"kl_div": first["layers"][1]["ffn_32"]["kl_div"]}
    # other held-out settings invalidate the cache
    go(settings=Settings(tokens=32, seq_len=16, batch_size=2), batches=batches[:1])
    assert len(set(calls)) == len(entries_of(sc.SPACE))


def test_coupled_pairs(tiny, tmp_path):
    cfg, tensors, parent, batches = tiny
    settings = Settings(tokens=64, seq_len=16, batch_size=2)
    out = score_space(parent, _weights_fn(cfg, tensors), sc.SPACE, batches, tmp_path, settings=settings, coupled=True,
                    only=["attn_kv1", "attn_no_op", "ffn_32", "ffn_linear", "ffn_48"], progress=False)
    assert sorted(out["layers"][1]) == ["attn_kv1+ffn_32", "attn_kv1+ffn_linear", "attn_no_op+ffn_32",
                                        "attn_no_op+ffn_linear"]
    assert sorted(out["layers"][0]) == ["attn_kv1+ffn_48"] and out["layers"][2] == {}


def test_tp2_and_dp2_equal_tp1(tiny, tmp_path):
    """Vocab-parallel metrics at TP 2 equal TP 1; the stage at TP 2 and spread over 2 DP ranks equals TP 1."""
    cfg, tensors, parent, batches = tiny
    lib = tmp_path / "library"
    sc.write_library(lib, cfg, tensors)
    settings = Settings(tokens=64, seq_len=16, batch_size=2)
    tp1 = score_space(parent, library_weights(lib), read_space(lib), batches, tmp_path / "tp1", settings=settings,
                    library_dir=lib, progress=False)
    torchrun(WORKER, 2, "--tp", "2", "1", "--library", str(lib), "--score-dir", str(tmp_path / "tp2"),
             str(tmp_path / "dp2"), "--metrics-out", str(tmp_path / "m.json"))
    want = reference_metrics(*random_logits())
    got = json.loads((tmp_path / "m.json").read_text())
    for m in ALL_METRICS:
        assert got[m] == pytest.approx(want[m], abs=1e-6), m
    dp2_cache = sorted(p.name for p in (tmp_path / "dp2" / "cache").iterdir())
    assert len(dp2_cache) == len(entries_of(sc.SPACE)) + 1  # both ranks' items and the parent
    for other in ("tp2", "dp2"):
        scores = json.loads((tmp_path / other / "scores.json").read_text())
        assert scores["tokens"] == tp1["tokens"] and scores["parent"] == pytest.approx(tp1["parent"], abs=1e-5)
        for mine, theirs in zip(tp1["layers"], scores["layers"]):
            assert mine.keys() == theirs.keys()
            for k in mine:
                assert theirs[k] == pytest.approx(mine[k], abs=2e-5), (other, k)


def test_cli_names_the_missing_stage(tmp_path, capsys):
    from megatron_puzzle.cli import main

    assert main(["score", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "parent" in err and "megatron-puzzle import" in err


CLI_WORKER = REPO / "tests" / "workers" / "cli_worker.py"


def _score_run(run, cfg, tensors):
    """A run directory the score stage reads: the tiny parent's checkpoint, held-out tokens, the library."""
    import numpy as np

    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.model import checkpoint
    from megatron_puzzle.model.gpt import build_model
    from megatron_puzzle.model.parallel import init_distributed
    from megatron_puzzle.utils.io import atomic_write_json

    init_distributed(tensor_parallel=1)  # a CLI test before may have shut this process's group down
    model = build_model(cfg)
    load_canonical(model, tensors)
    checkpoint.save(model, run / "parent")
    data = run / "data"
    data.mkdir(parents=True)
    g = np.random.default_rng(3)
    splits = {}
    for split in ("train", "calib", "heldout"):
        np.save(data / f"{split}.npy", g.integers(0, cfg.vocab_size, 512, dtype=np.uint32))
        splits[split] = {"file": f"{split}.npy", "tokens": 512}
    atomic_write_json(data / "meta.json", {"seed": 0, "vocab_size": cfg.vocab_size, "splits": splits})
    (data / "done").write_text("ok\n")
    sc.write_library(run / "library", cfg, tensors)
    (run / "library" / "done").write_text("ok\n")


def _cached(score_dir):
    return {p.name: json.loads(p.read_text()) for p in sorted((score_dir / "cache").iterdir())}


def test_pp2_scores_equal_pp1(tiny, tmp_path):
    """The score stage with the parent split over 2 pipeline stages (layers 0 | 1-2, torchrun 2 processes)
    gives every metric of every entry, and the parent's, that the stage gives in one process."""
    import shutil

    from megatron_puzzle.score import ScoreConfig, run_score

    cfg, tensors, _, _ = tiny
    one, two = tmp_path / "pp1", tmp_path / "pp2"
    _score_run(one, cfg, tensors)
    two.mkdir()
    for sub in ("parent", "data", "library"):
        shutil.copytree(one / sub, two / sub)
    args = dict(tokens=96, batch_size=2, seq_len=16)
    want = run_score(one, ScoreConfig(**args, max_entries=5, progress=False))
    torchrun(CLI_WORKER, 2, "score", "--run-dir", str(two), "--pp", "2", "--pp-first-stage-layers", "1",
             "--tokens", "96", "--batch-size", "2", "--seq-len", "16", "--max-entries", "5")
    got = json.loads((two / "score" / "scores.json").read_text())
    assert (two / "score" / "done").exists() and got.keys() == want.keys() and got["tokens"] == want["tokens"] == 96
    a, b = _cached(one / "score"), _cached(two / "score")
    assert a.keys() == b.keys() and len(a) == len(entries_of(sc.SPACE)) + 1  # every entry and the parent
    for name in a:
        assert a[name]["metrics"].keys() == b[name]["metrics"].keys() == {*ALL_METRICS, "tokens"}
        for m, v in a[name]["metrics"].items():
            assert b[name]["metrics"][m] == pytest.approx(v, rel=1e-6, abs=1e-6), (name, m)
    assert a["layer_002__attn_kv4.json"]["metrics"]["kl_div"] > 1e-4  # an entry on the second stage moved


def test_score_refuses_layouts_the_parent_cannot_take(tiny, tmp_path, capsys):
    from megatron_puzzle.cli import main

    cfg, tensors, _, _ = tiny
    _score_run(tmp_path, cfg, tensors)
    for argv, words in ((["--pp", "2"], "PP 2 does not split the parent's 3 layers evenly"),
                        (["--pipeline-parallel", "4"], "PP 4 exceeds the parent's 3 layers"),
                        (["--pp", "3"], "1 processes are not a multiple of TP x PP = 1 x 3")):
        assert main(["score", "--run-dir", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "score" / "scores.json").exists()
