"""The one place for parallel state: rank helpers before and after the process group, and its timeout."""

import os
import subprocess
import sys
from datetime import timedelta

import pytest

from megatron_puzzle.model import parallel

CHILD = """
import os, torch, torch.distributed as dist
from megatron_puzzle.model import parallel
parallel.init_process_group()
opts = dist.group.WORLD._get_backend(torch.device("cpu")).options
print(parallel.rank(), parallel.world_size(), parallel.is_rank0(), opts._timeout.total_seconds())
"""


def test_rank_helpers_read_torchrun_env_before_the_group(monkeypatch):
    # before the group starts (in this test process another test may have started a world of one)
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel, "_alone", False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (parallel.rank(), parallel.world_size(), parallel.is_rank0()) == (3, 4, False)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert (parallel.rank(), parallel.world_size(), parallel.is_rank0()) == (0, 1, True)


def test_timeout_default_env_and_bad_values(monkeypatch):
    monkeypatch.delenv(parallel.TIMEOUT_ENV, raising=False)
    assert parallel.timeout() == timedelta(minutes=30)
    assert parallel.timeout(2.5) == timedelta(minutes=2.5)
    monkeypatch.setenv(parallel.TIMEOUT_ENV, "90")
    assert parallel.timeout() == timedelta(minutes=90)
    monkeypatch.setenv(parallel.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="PUZZLE_DIST_TIMEOUT_MIN"):
        parallel.timeout()
    with pytest.raises(ValueError, match="positive"):
        parallel.timeout(0)


def test_process_group_gets_the_configured_timeout():
    """A fresh interpreter: the world group really waits as long as the env var says (not gloo's 30 min)."""
    env = dict(os.environ, PUZZLE_DIST_TIMEOUT_MIN="7", PYTHONWARNINGS="ignore")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split()[-4:] == ["0", "1", "True", "420.0"]


def test_free_port_is_bindable():
    import socket

    port = parallel.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_rank0_alone_under_torchrun():
    """Under torchrun, after the launch's group is shut down, rank 0 starts a world of one at once
    (a tcp:// rendezvous would wait for the launcher's store until the timeout)."""
    from _models import REPO

    worker = REPO / "tests" / "workers" / "alone_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={parallel.free_port()}",
           str(worker)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and "ALONE OK" in p.stdout, p.stderr[-3000:]
