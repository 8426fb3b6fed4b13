"""Atomic file and directory writes: a killed process never leaves a half-written result.

Every stage writes to a temporary sibling and renames it into place (rename is
atomic on POSIX within one filesystem). Directories get a `done` marker last, so a
reader trusts a directory only once the marker exists.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

DONE_MARKER = "done"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path next to `path`; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should be readable like any file
    try:
        yield tmp
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name; move it to `path` (with a done marker) on success.

    If the body raises, the temporary directory is removed and `path` is untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite and any(path.iterdir()):
        raise FileExistsError(f"{path} already exists and is not empty; choose another output directory or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
    try:
        yield tmp
        (tmp / DONE_MARKER).write_text("ok\n")
        move_dir_into_place(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def move_dir_into_place(tmp: Path, path: Path) -> None:
    """Rename a finished directory onto `path`, replacing any older one (kept aside until the rename)."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def remove_leftovers(root: str | Path, older_than: float | None = None) -> list[Path]:
    """Delete the temporary files and directories a killed writer left under `root`.

    `atomic_path` and `atomic_dir` clean up after themselves unless the process dies
    (SIGKILL, OOM, node loss); their temporaries are named `.NAME.XXXX.tmp`, and a replaced
    directory is parked as `.NAME.old` for the instant of the swap. Call this
    only where no other process can be writing under `root`: before a stage starts, on
    the launching rank, ahead of the distributed rendezvous. With `older_than` (a Unix
    time), only what was last modified before it is removed. Returns what was removed.
    """
    def stale(path: Path) -> bool:
        try:
            return older_than is None or path.lstat().st_mtime < older_than
        except FileNotFoundError:
            return False

    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames):
            if name.startswith(".") and name.endswith((".tmp", ".old")) and stale(Path(dirpath) / name):
                shutil.rmtree(Path(dirpath) / name, ignore_errors=True)
                removed.append(Path(dirpath) / name)
                dirnames.remove(name)  # do not walk into what was just removed
        for name in filenames:
            if name.startswith(".") and name.endswith(".tmp") and stale(Path(dirpath) / name):
                with contextlib.suppress(FileNotFoundError):
                    (Path(dirpath) / name).unlink()
                removed.append(Path(dirpath) / name)
    return removed


def is_launching_rank() -> bool:
    """True outside torchrun, and on global rank 0 under it (read from the environment, so it
    works before torch.distributed is initialised)."""
    return os.environ.get("RANK", "0") == "0"


def sweep_before_start(root: str | Path) -> None:
    """`remove_leftovers` on the launching rank only, of what an earlier launch left.

    A single process removes every temporary: nothing else writes here. Under torchrun with
    several ranks, only what is older than the torchrun agent (the ranks' parent) goes, since
    another rank of this launch may already be writing. (A process's start time is known
    only to about a second, which is why a single process does not use its own.)
    """
    if not is_launching_rank():
        return
    import time

    older_than = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import psutil

        older_than = psutil.Process().parent().create_time()
    for path in remove_leftovers(root, older_than=older_than):
        logging.getLogger(__name__).info("removed %s, left by a killed writer", path)


def is_done(path: str | Path) -> bool:
    return (Path(path) / DONE_MARKER).exists()


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)
