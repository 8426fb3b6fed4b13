"""Process groups: one place that starts torch.distributed and Megatron-Core's parallel state.

Works the same under `torchrun` (reads RANK / WORLD_SIZE / MASTER_ADDR from the
environment) and in a plain single process (starts a world of one on a free port).
CPU uses gloo; CUDA uses NCCL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from . import cpu_support

log = logging.getLogger(__name__)


# How long a collective may wait for a slow rank before the process group gives up. NCCL's
# default (10 min) is shorter than some rank-0-only stages (measure, search) that the other ranks
# wait out at a barrier; PUZZLE_DIST_TIMEOUT_MIN overrides it.
TIMEOUT_ENV = "PUZZLE_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 30.0


_alone = False  # set by `alone()`: this process ignores the launcher and works in a world of one


@contextlib.contextmanager
def alone():
    """Within: `init_process_group` starts a world of one even under torchrun, and `rank()`/`world_size()`
    say 0/1 (for a rank-0 stage that builds models, after the launch's process group is shut down)."""
    global _alone
    old, _alone = _alone, True
    try:
        yield
    finally:
        _alone = old


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous; another process may still take it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timeout(minutes: float | None = None) -> timedelta:
    """The collective timeout: `minutes`, else $PUZZLE_DIST_TIMEOUT_MIN, else 30 minutes."""
    if minutes is None:
        text = os.environ.get(TIMEOUT_ENV)
        try:
            minutes = float(text) if text else DEFAULT_TIMEOUT_MIN
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={text!r} is not a number of minutes; set it to e.g. 60") from None
    if minutes <= 0:
        raise ValueError(f"the process-group timeout must be positive, got {minutes} minutes")
    return timedelta(minutes=minutes)


def init_process_group(timeout_min: float | None = None) -> None:
    """Start torch.distributed (if not yet): from torchrun's environment, else a world of one."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" in os.environ and not _alone:  # torchrun / srun set the rendezvous
        dist.init_process_group(backend=backend, timeout=timeout(timeout_min))
    elif _alone:  # an in-process store: under torchrun a tcp:// rendezvous would wait for the launcher's store
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout(timeout_min))
    else:  # a world of one; nothing is put in os.environ, so child processes start clean
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1, timeout=timeout(timeout_min))
    log.debug("process group: %s, rank %d of %d", backend, dist.get_rank(), dist.get_world_size())


def init_distributed(tensor_parallel: int = 1, seed: int = 1234, timeout_min: float | None = None,
                     pipeline_parallel: int = 1) -> None:
    """Start the process group (if needed) and Megatron-Core's model-parallel state.

    Safe to call again with the same TP size; with another TP size the
    model-parallel state is rebuilt.
    """
    from megatron.core import parallel_state, tensor_parallel as mcore_tp

    cpu_support.apply()
    init_process_group(timeout_min)
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        from .gpt import LayoutError  # the commands check earlier (gpt.check_layout); this is the last guard

        raise LayoutError(
            f"tensor x pipeline parallel size {tensor_parallel} x {pipeline_parallel} does not divide the {world} "
            f"processes; launch a multiple of {tensor_parallel * pipeline_parallel} processes (torchrun --nproc-per-node)"
        )
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() == tensor_parallel
                and parallel_state.get_pipeline_model_parallel_world_size() == pipeline_parallel):
            return
        parallel_state.destroy_model_parallel()
    minutes = timeout(timeout_min).total_seconds() / 60  # Megatron's subgroups wait as long as the world group
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                             pipeline_model_parallel_size=pipeline_parallel,
                                             distributed_timeout_minutes=max(1, round(minutes)))
    mcore_tp.model_parallel_cuda_manual_seed(seed)


def rank() -> int:
    """Global rank: from the process group, else torchrun's RANK (before it starts), else 0."""
    if dist.is_initialized():
        return dist.get_rank()
    return 0 if _alone else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes: from the process group, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_initialized():
        return dist.get_world_size()
    return 1 if _alone else int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    return rank() == 0


def tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def dp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_rank0(obj):
    """Rank 0's `obj` on every rank (a picklable value; as is without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
