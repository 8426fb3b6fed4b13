"""utils/preempt.py: a stop request on one rank stops every rank at the same step.

Real launches: two gloo processes under torchrun; the test signals one of them (or creates the stop
file) while both are stepping, and both must leave the loop at the same step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from _models import REPO, free_port

WORKER = REPO / "tests" / "workers" / "preempt_worker.py"


def _wait_for(cond, timeout: float, what: str, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the launch ended while waiting for {what}:\n{out[-2000:]}\n{err[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("how, rank", [("SIGUSR1", 1), ("SIGTERM", 0), ("file", None)])
def test_one_request_stops_both_ranks_at_the_same_step(tmp_path, how, rank):
    stop_file = tmp_path / "stop"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PUZZLE_PREEMPT_FILE=str(stop_file),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(WORKER), str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def stepping():
            return all((tmp_path / f"progress{r}").exists() and int((tmp_path / f"progress{r}").read_text() or 0) >= 5
                       for r in (0, 1))

        _wait_for(stepping, 90, "both ranks to step", proc)
        if how == "file":
            stop_file.touch()
        else:
            os.kill(int((tmp_path / f"pid{rank}").read_text()), getattr(signal, how))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
    res = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1)]
    assert all(r["stopped"] for r in res), res
    assert res[0]["step"] == res[1]["step"] >= 5, res
    for r in (0, 1):
        expected = f"stop file {stop_file}" if how == "file" else (how if r == rank else None)
        assert res[r]["local"] == expected, res


def test_without_a_process_group_and_a_second_signal(tmp_path):
    """One process: the first SIGTERM is a request, the second ends the process as SIGTERM does."""
    code = (
        "import os, signal, sys\n"
        "from megatron_puzzle.utils import preempt\n"
        "assert not preempt.requested()\n"
        "with preempt.watching():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    assert preempt.requested() and preempt.local_request() == 'SIGTERM'\n"
        "    print('first', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print('survived', flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("PUZZLE_PREEMPT_FILE", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["first"], (proc.stdout, proc.stderr)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stderr)


def test_every_n_steps_only_multiples_ask(monkeypatch, tmp_path):
    from megatron_puzzle.utils import preempt

    monkeypatch.setenv(preempt.STOP_FILE_ENV, str(tmp_path / "stop"))
    (tmp_path / "stop").touch()
    try:
        assert [preempt.requested(step=s, every=4) for s in range(1, 9)] == [False, False, False, True] * 2
        assert preempt.requested()
    finally:
        preempt.reset()


def test_watching_restores_the_previous_handlers():
    from megatron_puzzle.utils import preempt

    before = {s: signal.getsignal(s) for s in preempt.SIGNALS}
    with preempt.watching():
        assert all(signal.getsignal(s) is not before[s] for s in preempt.SIGNALS)
    assert {s: signal.getsignal(s) for s in preempt.SIGNALS} == before
    preempt.reset()
