"""Calibration statistics of the parent's FFNs, streamed over calibration batches.

Per layer: the mean |activation| of every FFN channel (for channel-contribution
pruning) and the normal equations of the FFN's normed input -> output map (for the
least-squares linear FFN). Nothing is kept per token: each batch's activations are
folded into running sums and dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

import torch
from tqdm.auto import tqdm

from ..model.activations import parent_activations
from .methods import LstsqAccumulator, ffn_activations

log = logging.getLogger(__name__)


@dataclass
class CalibrationStats:
    abs_act_sum: list[torch.Tensor] = field(default_factory=list)  # [M] per layer, float64
    lstsq: list[LstsqAccumulator] = field(default_factory=list)
    tokens: int = 0

    def mean_abs_activation(self, layer: int) -> torch.Tensor:
        return (self.abs_act_sum[layer] / max(self.tokens, 1)).float()


@torch.no_grad()
def collect_calibration(model, parent_tensors: dict[str, torch.Tensor], batches: Iterable[torch.Tensor],
                        *, need_channels: bool = True, need_lstsq: bool = True, progress: bool = True) -> CalibrationStats:
    """Stream `batches` ([batch, seq] tokens) through the parent and accumulate per-layer statistics."""
    cfg = model.puzzle_config
    L, h = cfg.num_layers, cfg.hidden_size
    stats = CalibrationStats(
        abs_act_sum=[torch.zeros(cfg.intermediate_size, dtype=torch.float64) for _ in range(L)] if need_channels else [],
        lstsq=[LstsqAccumulator(h, h) for _ in range(L)] if need_lstsq else [],
    )
    for tokens in tqdm(list(batches), desc="calibration", disable=not progress, leave=False):
        acts = parent_activations(model, tokens)
        stats.tokens += tokens.numel()
        for i in range(L):
            layer = model.decoder.layers[i]
            x = layer.pre_mlp_layernorm(acts.h_mid[i]).reshape(-1, h).float().cpu()
            if need_channels:
                p = f"model.layers.{i}.mlp."
                a = ffn_activations(x, parent_tensors[p + "gate_proj.weight"], parent_tensors[p + "up_proj.weight"])
                stats.abs_act_sum[i] += a.abs().sum(dim=0).double()
            if need_lstsq:
                y = (acts.h_in[i + 1] - acts.h_mid[i]).reshape(-1, h).float().cpu()
                stats.lstsq[i].add(x, y)
    log.info("calibration: %d tokens through %d layers", stats.tokens, L)
    return stats
