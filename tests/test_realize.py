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


def test_realize_at_pp2_equals_pp1(tiny_run, tmp_path):
    """realize with the child split over 2 pipeline stages (layers 0 | 1-3, torchrun 2 processes): each stage
    builds and writes its own layers, and the one checkpoint they write, loaded at PP 1, holds exactly the
    tensors realize writes in one process; the held-out evaluation through the stages gives the same metrics."""
    import shutil

    from _models import REPO, torchrun

    one, two = tmp_path / "pp1", tmp_path / "pp2"
    for run in (one, two):  # no measure/: no timing, the same report fields on both sides
        shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("child", "measure"))
    want = realize(one, 1, eval_tokens=512, seq_len=32, batch_size=4)
    torchrun(REPO / "tests" / "workers" / "cli_worker.py", 2, "realize", "--run-dir", str(two), "--solution", "1",
             "--pp", "2", "--pp-first-stage-layers", "1", "--eval-tokens", "512", "--seq-len", "32",
             "--batch-size", "4")
    got = json.loads((two / "child" / "realize.json").read_text())
    assert got.keys() == want.keys() and got["variants"] == want["variants"]
    q1, q2 = want["measured_quality"], got["measured_quality"]
    assert q1.keys() == q2.keys() and q1["tokens"] == q2["tokens"] > 0
    for k, v in q1.items():
        assert q2[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    assert q1["kl_div"] > 1e-4  # the child differs from the parent: the comparison means something
    a, b = (checkpoint.load(run / "child") for run in (one, two))  # both at PP 1
    sa, sb = ({k: v for k, v in m.state_dict().items() if not k.endswith("_extra_state")} for m in (a, b))
    assert sa.keys() == sb.keys() and any(k.startswith("decoder.layers.3.") for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert checkpoint.load_config(two / "child") == checkpoint.load_config(one / "child")


def test_realize_refuses_layouts_the_child_cannot_take(tiny_run, tmp_path, capsys):
    import shutil

    from megatron_puzzle.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("child", "measure"))
    for argv, words in ((["--pp", "3"], "PP 3 does not split the child's 4 layers evenly"),
                        (["--pipeline-parallel", "5"], "PP 5 exceeds the child's 4 layers"),
                        (["--pp", "2", "--pp-first-stage-layers", "4"], "first/last pipeline stage layers 4/None"),
                        (["--pp", "2"], "1 processes are not a multiple of TP x PP = 1 x 2")):
        assert main(["realize", "--run-dir", str(run), "--solution", "1", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not (run / "child").exists()
