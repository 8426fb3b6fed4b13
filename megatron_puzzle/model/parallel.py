"""Process groups: one place that starts torch.distributed and Megatron-Core's parallel state.

Works the same under `torchrun` (reads RANK / WORLD_SIZE / MASTER_ADDR from the
environment) and in a plain single process (starts a world of one on a free port).
CPU uses gloo; CUDA uses NCCL.
"""

from __future__ import annotations

import logging
import os
import socket

import torch
import torch.distributed as dist

from . import cpu_support

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tensor_parallel: int = 1, seed: int = 1234, pipeline_parallel: int = 1) -> None:
    """Start the process group (if needed) and Megatron-Core's model-parallel state.

    Safe to call again with the same TP size; with another TP size the
    model-parallel state is rebuilt.
    """
    from megatron.core import parallel_state, tensor_parallel as mcore_tp

    cpu_support.apply()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "RANK" in os.environ:  # torchrun / srun set the rendezvous
            dist.init_process_group(backend=backend)
        else:  # a world of one; nothing is put in os.environ, so child processes start clean
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
        log.debug("process group: %s, rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"tensor x pipeline parallel size {tensor_parallel} x {pipeline_parallel} does not divide the {world} "
            f"processes; launch a multiple of {tensor_parallel * pipeline_parallel} processes (torchrun --nproc-per-node)"
        )
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() == tensor_parallel
                and parallel_state.get_pipeline_model_parallel_world_size() == pipeline_parallel):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                             pipeline_model_parallel_size=pipeline_parallel)
    mcore_tp.model_parallel_cuda_manual_seed(seed)


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


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
