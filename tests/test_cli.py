"""The command's error handling: input errors are one line (exit 2), bugs keep their tracebacks, and
under torchrun a failing rank exits at once."""

import argparse
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
