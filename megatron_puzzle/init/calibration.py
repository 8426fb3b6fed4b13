"""Calibration statistics of the parent's FFNs, streamed over calibration batches on the model's device.

Per layer: the mean |activation| of every FFN channel (for channel-contribution
pruning) and the normal equations of the FFN's normed input -> output map (for the
least-squares linear FFN). Nothing is kept per token: each batch's activations are
folded into running sums and dropped.

The loop runs layer by layer over all calibration batches at once: only the batches'
hidden states at the current layer ([batches x batch x seq x hidden], independent of
the depth) and that layer's accumulators are on the device; a finished layer's sums
go to the host. Channel activations come from the parent layer's own (TP-sharded)
`linear_fc1`, so each rank sums its own channels and the sums are gathered once per layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..model import forward, parallel
from .methods import LstsqAccumulator

log = logging.getLogger(__name__)


@dataclass
class CalibrationStats:
    abs_act_sum: list[torch.Tensor] = field(default_factory=list)  # [M] per layer, float64, host
    lstsq: list[LstsqAccumulator] = field(default_factory=list)  # host
    tokens: int = 0

    def mean_abs_activation(self, layer: int) -> torch.Tensor:
        return (self.abs_act_sum[layer] / max(self.tokens, 1)).float()


def _gather_channels(local: torch.Tensor) -> torch.Tensor:
    """This TP rank's channel sums -> every channel's, in the canonical order (rank r holds block r)."""
    if parallel.tp_size() == 1:
        return local
    from megatron.core import parallel_state

    parts = [torch.empty_like(local) for _ in range(parallel.tp_size())]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts)


@torch.no_grad()
def collect_calibration(model, parent_tensors=None, batches: Iterable[torch.Tensor] = (), *,
                        need_channels: bool = True, need_lstsq: bool = True, progress: bool = True) -> CalibrationStats:
    """Stream `batches` ([batch, seq] tokens) through the parent and accumulate per-layer statistics.

    `parent_tensors` is not read (the parent layers' own modules are used); it stays for callers."""
    cfg = model.puzzle_config
    h = cfg.hidden_size
    dev = parallel.device()
    stats = CalibrationStats()
    hidden = []
    for tokens in batches:
        tokens = tokens.to(dev)
        stats.tokens += tokens.numel()
        hidden.append(forward.embed(model, tokens))
    ropes = [forward.rotary(model, x.shape[0]) for x in hidden]
    layers = model.decoder.layers
    for i in tqdm(range(len(layers)), desc="calibration", disable=not progress, leave=False):
        layer = layers[i]
        abs_sum = None
        acc = LstsqAccumulator(h, h, device=dev) if need_lstsq else None
        for k, x in enumerate(hidden):
            mid: list[torch.Tensor] = []
            handle = layer.pre_mlp_layernorm.register_forward_pre_hook(lambda _m, args: mid.append(args[0]))
            try:
                out, _ = layer(x, attention_mask=None, rotary_pos_emb=ropes[k])
            finally:
                handle.remove()
            normed = layer.pre_mlp_layernorm(mid[0])
            if need_channels:
                gate, up = layer.mlp.linear_fc1(normed)[0].chunk(2, dim=-1)  # this rank's [gate_r; up_r]
                a = (F.silu(gate.float()) * up.float()).reshape(-1, gate.shape[-1]).abs().sum(dim=0).double()
                abs_sum = a if abs_sum is None else abs_sum + a
            if need_lstsq:
                acc.add(normed.reshape(-1, h), (out - mid[0]).reshape(-1, h))
            hidden[k] = out
        if need_channels:
            stats.abs_act_sum.append(_gather_channels(abs_sum).cpu())
        if need_lstsq:
            stats.lstsq.append(acc.to(torch.device("cpu")))
    log.info("calibration: %d tokens through %d layers", stats.tokens, len(layers))
    return stats
