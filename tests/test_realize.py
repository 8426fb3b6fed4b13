"""Realize: a searched solution becomes a child checkpoint whose weights are exactly the library's."""

import json

import pytest
import torch

from _runs import make_tiny_run
from megatron_puzzle.convert.megatron_layout import canonical_state
from megatron_puzzle.library import Library
from megatron_puzzle.model import checkpoint
from megatron_puzzle.pipeline.realize import RealizeError, realize
from megatron_puzzle.search.run import search_run_dir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mcore):
    run = tmp_path_factory.mktemp("realize") / "run"
    make_tiny_run(run)
    (run / "child").rename(run / "child_prebuilt")  # realize writes its own
    search_run_dir(run, ["throughput>=1.3x"], "kl_div", num_solutions=2, min_diff=1, plots=False)
    return run


def test_realized_child_weights_are_the_library_entries(tiny_run):
    run = tiny_run
    report = realize(run, 1, eval_tokens=256, seq_len=32, batch_size=4, warmup=0, repeats=1)
    sol = json.loads((run / "search" / "solutions.json").read_text())["solutions"][1]
    child = checkpoint.load(run / "child")
    assert [[b.attention.name, b.ffn.name] for b in child.puzzle_config.blocks] == sol["variants"]
    weights = canonical_state(child)
    _assert_library_weights(weights, run, sol["variants"])
    # predicted next to measured
    assert report["variants"] == sol["variants"]
    assert report["predicted"]["objective"] == pytest.approx(sol["objective"])
    assert report["measured"]["throughput"] > 0 and report["measured_parent"]["throughput"] > 0
    assert 0 <= report["measured_quality"]["kl_div"] and report["measured_quality"]["tokens"] > 0
    assert json.loads((run / "child" / "realize.json").read_text()) == report
    # a finished realize is kept
    assert realize(run, 1) == report


def test_realize_cli_exports_the_child_to_hf(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_puzzle.cli import main
    from megatron_puzzle.model import forward

    out = tmp_path / "hf"
    assert main(["realize", "--run-dir", str(tiny_run), "--solution", "1", "--export-hf", str(out)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    child = checkpoint.load(tiny_run / "child")
    tokens = torch.randint(0, child.puzzle_config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - forward.full_logits(child, tokens)).abs().max().item() <= 1e-4
    assert main(["realize", "--run-dir", str(tiny_run), "--solution", "1", "--export-hf", str(out)]) == 2


def test_realize_names_a_missing_solution(tiny_run, tmp_path):
    with pytest.raises(RealizeError, match="solution 7 does not exist"):
        realize(tiny_run, 7, force=True)
    with pytest.raises(RealizeError, match="run `megatron-puzzle search"):
        realize(tmp_path, 0)


def test_realize_at_tp2_writes_shards_that_load_as_the_library_entries(tiny_run, tmp_path):
    import shutil

    from _models import REPO, torchrun

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("child", "measure"))  # no timing at TP 2
    torchrun(REPO / "tests" / "workers" / "realize_worker.py", 2, str(run), "1", "2")
    sol = json.loads((run / "search" / "solutions.json").read_text())["solutions"][1]
    assert json.loads((run / "child" / "realize.json").read_text())["variants"] == sol["variants"]
    weights = canonical_state(checkpoint.load(run / "child"))  # saved at TP 2, loaded at TP 1
    _assert_library_weights(weights, run, sol["variants"])


def _assert_library_weights(weights, run, variants):
    """The child's canonical weights are exactly the library entries of its variants (and the non-block parts)."""
    lib = Library(run / "library")
    expected = dict(lib.non_block())
    for i, (attn, ffn) in enumerate(variants):
        expected.update(lib.load(i, attn))
        expected.update(lib.load(i, ffn))
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
