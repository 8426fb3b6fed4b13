"""Atomic writes and the cleanup of what a killed writer leaves behind."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from megatron_puzzle.utils.io import atomic_write_json, is_done, read_json, remove_leftovers, sweep_before_start

_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from megatron_puzzle.utils.io import atomic_dir, atomic_path
    root = sys.argv[1]
    with atomic_path(os.path.join(root, "half.json")) as tmp:
        open(tmp, "w").write("{")
        with atomic_dir(os.path.join(root, "entry")) as d:
            open(d / "weights.safetensors", "wb").write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)  # dies inside both writers: no cleanup runs
""")


def test_killed_writer_leaves_temporaries_that_the_sweep_removes(tmp_path):
    atomic_write_json(tmp_path / "kept" / "result.json", {"x": 1})
    p = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)])
    assert p.returncode == -signal.SIGKILL
    left = sorted(p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp"))
    assert len(left) == 2, left  # one file, one directory (with a weights file inside)
    assert not is_done(tmp_path / "entry")

    removed = remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == left
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert not list(tmp_path.rglob("*.safetensors"))
    assert read_json(tmp_path / "kept" / "result.json") == {"x": 1}


@pytest.mark.parametrize("rank,world,removes_old,removes_fresh", [
    ("0", None, True, True),  # one process: nothing else can be writing, everything goes
    ("0", "2", True, False),  # torchrun: what another rank of this launch writes now is kept
    ("1", "2", False, False),  # only the launching rank sweeps
])
def test_sweep_keeps_what_this_launch_writes(tmp_path, monkeypatch, rank, world, removes_old, removes_fresh):
    (tmp_path / ".entry.abc.tmp").mkdir()
    (tmp_path / ".entry.old").mkdir()  # a replaced directory parked during a swap that was killed
    for name in (".entry.abc.tmp", ".entry.old"):  # both left by an earlier launch
        os.utime(tmp_path / name, (0, 0))
    (tmp_path / ".other.xyz.tmp").mkdir()  # written just now
    monkeypatch.setenv("RANK", rank)
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    sweep_before_start(tmp_path)
    assert (tmp_path / ".entry.abc.tmp").exists() != removes_old
    assert (tmp_path / ".entry.old").exists() != removes_old
    assert (tmp_path / ".other.xyz.tmp").exists() != removes_fresh
