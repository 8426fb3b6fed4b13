"""One pipeline stage outside Megatron-Core's training schedules: its layers and its neighbours.

Scoring and BLD run the parent forward-only and restart it from any layer, so they do not
go through `get_forward_backward_func`; they hand hidden states to the next stage with
Megatron-Core's own `P2PCommunicator` (the schedules' point-to-point layer) instead.
`PipeStage` says which global layers this rank's stage model holds (Megatron-Core's split,
even or uneven, the one `gpt.check_layout` validates) and which stage owns any layer.
At PP 1 it is the whole model and sends nothing. Hidden states are [seq, batch, hidden]
in the config's `pipeline_dtype`.
"""

from __future__ import annotations

import torch


class PipeStage:
    """This rank's pipeline stage of a GPTModel built by `gpt.build_model` (PP 1: the whole model)."""

    def __init__(self, model):
        from megatron.core import parallel_state as ps

        from .gpt import _stage_layers

        cfg, tcfg = model.puzzle_config, model.config
        self.model = model
        self.size = ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        self.rank = ps.get_pipeline_model_parallel_rank() if self.size > 1 else 0
        first = tcfg.num_layers_in_first_pipeline_stage if self.size > 1 else None
        last = tcfg.num_layers_in_last_pipeline_stage if self.size > 1 else None
        counts = _stage_layers(cfg.num_layers, self.size, first, last)
        if counts is None or len(model.decoder.layers) != counts[self.rank]:
            raise RuntimeError(f"pipeline stage {self.rank} holds {len(model.decoder.layers)} layers, expected "
                               f"{counts and counts[self.rank]}: build the model after init_distributed "
                               "with the same PP")
        self.starts = [sum(counts[:r]) for r in range(self.size)] + [cfg.num_layers]
        self.offset = self.starts[self.rank]
        self.layers = range(self.offset, self.starts[self.rank + 1])  # global indices held here
        self.is_first, self.is_last = self.rank == 0, self.rank == self.size - 1
        self.dtype = tcfg.pipeline_dtype or tcfg.params_dtype
        self._comm = None
        if self.size > 1:
            from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

            self._comm = P2PCommunicator(ps.get_pipeline_model_parallel_group(), tcfg)

    def owner(self, layer: int) -> int:
        """The pipeline rank holding global layer `layer`."""
        return next(r for r in range(self.size) if self.starts[r] <= layer < self.starts[r + 1])

    def local(self, layer: int) -> int:
        """Index into this stage's `decoder.layers` of global layer `layer` (held here)."""
        if layer not in self.layers:
            raise IndexError(f"layer {layer} is on pipeline stage {self.owner(layer)}, not {self.rank}")
        return layer - self.offset

    def recv(self, shape) -> torch.Tensor:
        """The previous stage's hidden states (shape [seq, batch, hidden]), detached."""
        h = self._comm.recv_forward(tuple(shape), is_first_stage=False)
        return h.detach()

    def send(self, hidden: torch.Tensor) -> None:
        """Hand `hidden` to the next stage (nothing on the last)."""
        if not self.is_last:
            self._comm.send_forward(hidden.detach().to(self.dtype).contiguous(), is_last_stage=False)

    def group(self):
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_group() if self.size > 1 else None

    def gather(self, obj) -> list:
        """Every pipeline stage's `obj` (a picklable value), in stage order; [obj] at PP 1."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group())
        return out
