"""The command's error handling: input errors are one line (exit 2), bugs keep their tracebacks, and
under torchrun a failing rank exits at once."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from megatron_puzzle import cli
from megatron_puzzle.pipeline.config import ConfigError
from megatron_puzzle.utils.errors import InputError

ERRORS = {"user": cli.UserError("bad --x; use 3"), "input": InputError("search_space: bad kv_heads"),
          "config": ConfigError("unknown section"), "missing": FileNotFoundError("RUN/parent is missing"),
          "bug": ValueError("shapes (2,) and (3,) do not broadcast"), "keyerror": KeyError("step")}


@pytest.fixture
def boom(monkeypatch):
    def parser():
        p = argparse.ArgumentParser(prog="megatron-puzzle")
        p.add_argument("-v", "--verbose", action="store_true")
        sub = p.add_subparsers(dest="command")
        b = sub.add_parser("boom")
        b.add_argument("kind")

        def run(args):
            if args.kind == "group":  # a command that starts a process group and succeeds
                from megatron_puzzle.model import parallel

                parallel.init_process_group()
                return 0
            raise ERRORS[args.kind]

        b.set_defaults(func=run)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.mark.parametrize("kind", ["user", "input", "config", "missing"])
def test_input_errors_are_one_line(boom, capsys, kind):
    assert cli.main(["boom", kind]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-puzzle boom: error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("kind", ["bug", "keyerror"])
def test_bugs_keep_their_tracebacks(boom, kind):
    """A plain ValueError is not taken for bad input any more."""
    with pytest.raises(type(ERRORS[kind])):
        cli.main(["boom", kind])


def test_verbose_shows_the_traceback_of_input_errors(boom):
    with pytest.raises(cli.UserError):
        cli.main(["-v", "boom", "user"])


def test_a_command_destroys_the_process_group_it_started(boom):
    """A gloo group left to the interpreter's exit can abort a rank after its command succeeded, so the
    command destroys the group it started; one its caller started stays up."""
    import torch.distributed as dist

    from megatron_puzzle.model import parallel

    parallel.shutdown()  # the session's group, if an earlier test started it (restored after this test)
    assert cli.main(["boom", "group"]) == 0
    assert not dist.is_initialized()
    parallel.init_process_group()
    try:
        assert cli.main(["boom", "group"]) == 0
        assert dist.is_initialized()
    finally:
        parallel.shutdown()


def test_registered_input_errors_exist():
    """Every class INPUT_ERRORS names is there, so a rename in a stage does not silently make it a bug."""
    import importlib

    for module, name in cli.INPUT_ERRORS:
        cls = getattr(importlib.import_module(module), name)
        assert isinstance(cls, type) and issubclass(cls, Exception), (module, name)


CHILD = """
import sys, threading, time
from megatron_puzzle import cli
from megatron_puzzle.utils.errors import InputError
import argparse

def parser():
    p = argparse.ArgumentParser(); p.add_argument("-v", "--verbose", action="store_true")
    s = p.add_subparsers(dest="command"); b = s.add_parser("boom"); b.add_argument("kind")
    def run(args):
        threading.Thread(target=time.sleep, args=(600,)).start()  # a thread that would keep a normal exit waiting
        raise InputError("bad") if args.kind == "input" else RuntimeError("bug")
    b.set_defaults(func=run)
    return p

cli.build_parser = parser
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("kind,code", [("input", 2), ("bug", 1)])
def test_a_failing_rank_exits_at_once_under_torchrun(kind, code):
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-c", CHILD, "boom", kind], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == code
    if kind == "input":
        assert "megatron-puzzle boom (rank 1): error: bad" in p.stderr and "Traceback" not in p.stderr
    else:
        assert "Traceback" in p.stderr and "RuntimeError: bug" in p.stderr


# --------------------------------------------------------------------------- parallel sizes, every command

def _fake_checkpoint(path, cfg):
    """What a command reads before building anything: the config and the done marker."""
    path.mkdir(parents=True)
    cfg.save(path / "model_config.json")
    (path / "done").write_text("ok\n")
    return path


def _refused(capsys, argv, expect):
    from megatron_puzzle.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    return err[0]


def test_parallel_sizes_are_refused_before_building_by_every_model_command(tmp_path, capsys):
    """import-hf, export-hf, bld (and init), score, realize and run refuse a TP the parent, a
    search-space variant or the child cannot take: one line naming layer, size and valid choices,
    exit 2, no output written (gkd: tests/test_gkd.py)."""
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    from _models import tiny_parent

    parent = tiny_parent()  # 4 heads, 2 KV heads, FFN 96, 4 layers
    hf = tmp_path / "hf"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(hf)
    capsys.readouterr()  # save_pretrained's progress bars
    _refused(capsys, ["import-hf", str(hf), str(tmp_path / "imported"), "--tp", "3"],
             "TP 3 does not split the checkpoint's 4 query heads; valid TP: 1, 2, 4")
    assert not (tmp_path / "imported").exists()
    ckpt = _fake_checkpoint(tmp_path / "ckpt", parent)
    _refused(capsys, ["export-hf", str(ckpt), str(tmp_path / "exported"), "--tp", "3"],
             "TP 3 does not split the checkpoint's 4 query heads; valid TP: 1, 2, 4")
    assert not (tmp_path / "exported").exists()

    run = tmp_path / "run"
    _fake_checkpoint(run / "parent", parent)
    (run / "data").mkdir()
    (run / "data" / "done").write_text("ok\n")
    # a search-space variant (FFN 50 from round_to 10) that TP 4 cannot split, though the parent can
    (tmp_path / "bld.yaml").write_text(yaml.safe_dump({"search_space": {"round_to": 10, "ffn_fractions": [1.0, 0.5]},
                                                       "bld": {"tensor_parallel": 4}}))
    for command in ("init", "bld"):
        _refused(capsys, [command, "--run-dir", str(run), "--config", str(tmp_path / "bld.yaml"), "--no-progress"],
                 "layer 0 variant ffn_50: TP 4 does not split its FFN size 50; valid TP: 1, 2")
    assert sorted(p.name for p in run.iterdir()) == ["data", "parent"]

    (run / "library").mkdir()
    (run / "library" / "space.json").write_text(json.dumps([["attn_kv2", "ffn_96+attn_kv1", "ffn_50"]] * 4))
    (run / "library" / "done").write_text("ok\n")
    _refused(capsys, ["score", "--run-dir", str(run), "--tensor-parallel", "4"],
             "layer 0 variant ffn_50: TP 4 does not split its FFN size 50; valid TP: 1, 2")
    assert not (run / "score").exists()

    (run / "search").mkdir()
    from megatron_puzzle.arch.block_config import blocks_to_json

    (run / "search" / "solutions.json").write_text(json.dumps({"solutions": [{"blocks": blocks_to_json(
        parent.blocks, hidden_size=parent.hidden_size, num_attention_heads=parent.num_attention_heads)}]}))
    _refused(capsys, ["realize", "--run-dir", str(run), "--tensor-parallel", "3"],
             "TP 3 does not split the child's 4 query heads; valid TP: 1, 2, 4")
    assert not (run / "child").exists()

    # the whole pipeline: its parent's config.json against tensor_parallel and GKD's pipeline_parallel
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"parent": str(hf), "pipeline_parallel": 3}))
    _refused(capsys, ["run", "--config", str(tmp_path / "run.yaml"), "--run-dir", str(tmp_path / "whole")],
             "PP 3 exceeds the parent's 2 layers; valid PP: 1..2")
    assert not (tmp_path / "whole").exists()


def test_every_rank_prints_the_same_layout_error_and_exits_at_once(tmp_path):
    """Under torchrun (2 processes, --tp 4) the launch ends non-zero within seconds with the one-line
    error. Each rank alone (its partner never started) prints the same line and exits 2: the check
    runs before any process group, so no rank waits for the others."""
    import re
    import time

    from _models import REPO, tiny_parent
    from megatron_puzzle.model.parallel import free_port

    expect = ("2 processes are not a multiple of TP x PP = 4 x 1 = 4; launch a multiple of 4 "
              "(torchrun --nproc-per-node) or change --tp/--pp")
    ckpt = _fake_checkpoint(tmp_path / "ckpt", tiny_parent())
    command = ["-m", "megatron_puzzle", "export-hf", str(ckpt), str(tmp_path / "out"), "--tp", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        f"--master-port={free_port()}", *command], capture_output=True, text=True, timeout=120,
                       cwd=REPO, env=env)
    seconds = time.perf_counter() - t0
    lines = re.findall(r"megatron-puzzle export-hf \(rank \d\): error: (.*)", p.stderr)
    assert p.returncode != 0 and lines and set(lines) == {expect}, p.stderr[-3000:]
    assert seconds < 60, seconds
    for r in (0, 1):  # one at a time: a rank that reached the process group would wait there for its partner
        alone = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=REPO, timeout=90,
                               env=dict(env, WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                        MASTER_PORT=str(free_port()), PUZZLE_DIST_TIMEOUT_MIN="1"))
        assert alone.returncode == 2, alone.stderr[-3000:]
        assert alone.stderr.strip().splitlines()[-1] == f"megatron-puzzle export-hf (rank {r}): error: {expect}"
        assert "Traceback" not in alone.stderr
    assert not (tmp_path / "out").exists()
