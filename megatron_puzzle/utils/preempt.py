"""Preemption: a stop request seen by any rank makes every rank stop at the same step.

A training loop calls `requested()` once per step (every rank, collectively: it is one all-reduce of
one integer) and, when it returns True, saves its checkpoint and returns; since every rank gets the
same answer at the same step, no rank waits in a collective for one that already left.

A stop is requested by
- SIGUSR1 or SIGTERM to a rank's process, once `install()` (or `watching()`) has set the handlers; a
  second signal of the same kind does what it would have done without them (SIGTERM ends the process),
  so a stuck rank can still be stopped;
- a file at the path in $PUZZLE_PREEMPT_FILE appearing (examples/slurm/puzzle.sbatch creates it when
  Slurm sends USR1 before the time limit). A file reaches the ranks through torchrun's agent and a
  container unchanged; a signal does not: torchrun's agent has no SIGUSR1 handler (the signal ends
  it) and answers SIGTERM by killing its workers 30 s later, too soon for a large checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STOP_FILE_ENV = "PUZZLE_PREEMPT_FILE"

class Preempted(Exception):
    """A loop saved its state and stopped on a stop request; the command exits 0 and a rerun resumes."""


_received: int | None = None  # the signal this process got, if any
_previous: dict[int, object] = {}  # handlers replaced by install()
_announced = False


def _handler(signum, frame) -> None:
    global _received
    if _received == signum:  # the second time: act as if we were not here
        signal.signal(signum, _previous.get(signum, signal.SIG_DFL))
        os.kill(os.getpid(), signum)
        return
    _received = signum
    # no logging here: a handler may interrupt a logging call that holds its lock


def install(signals=SIGNALS) -> None:
    """Make `signals` request a stop instead of ending the process (main thread only: Python runs
    handlers there, so elsewhere only the stop file can ask)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        log.debug("not the main thread: signals keep their handlers, the stop file still works")
        return
    for sig in signals:
        if signal.getsignal(sig) is not _handler:
            _previous[sig] = signal.signal(sig, _handler)


def uninstall() -> None:
    """Restore the handlers `install()` replaced."""
    for sig, old in list(_previous.items()):
        signal.signal(sig, old)
        del _previous[sig]


@contextlib.contextmanager
def watching(signals=SIGNALS) -> Iterator[None]:
    """`install()` for the duration of a loop, restoring the previous handlers after it."""
    install(signals)
    try:
        yield
    finally:
        uninstall()


def local_request() -> str | None:
    """Why this process wants to stop (a signal name or the stop file), or None."""
    if _received is not None:
        return signal.Signals(_received).name
    path = os.environ.get(STOP_FILE_ENV)
    if path and os.path.exists(path):
        return f"stop file {path}"
    return None


def requested(group: dist.ProcessGroup | None = None, *, step: int | None = None, every: int = 1) -> bool:
    """True on every rank of `group` (default: the world) once any rank saw a stop request.

    Collective when torch.distributed is initialised: every rank of the group must call it at the same
    point of its loop. It costs one all-reduce of one integer and a wait for it; with `step` and `every`,
    only steps that are multiples of `every` ask (the others return False at once, on every rank alike).
    """
    global _announced
    if step is not None and every > 1 and step % every:
        return False
    why = local_request()
    stop = why is not None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        on_gpu = dist.get_backend(group) == "nccl"
        flag = torch.tensor([int(stop)], dtype=torch.int32,
                            device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        stop = bool(flag.item())
    if stop and not _announced:
        _announced = True
        log.warning("stop requested (%s): saving and stopping", why or "by another rank")
    return stop


def reset() -> None:
    """Forget a request (after the loop that answered it, or between tests)."""
    global _received, _announced
    _received, _announced = None, False
