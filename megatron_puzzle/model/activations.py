"""The parent's hidden states at every layer, from one forward pass.

BLD and calibration need, per layer i of the parent:
- `h_in[i]`: the layer's input (= output of layer i-1; `h_in[L]` is the last output),
- `h_mid[i]`: the hidden states after the attention subblock (residual added), i.e.
  the input of the FFN subblock.

A parent block's output is `h_in[i + 1]`; the FFN subblock alone maps `h_mid[i]`
to `h_in[i + 1]`. `h_mid` is captured by a forward pre-hook on each layer's
`pre_mlp_layernorm` (the module the FFN subblock starts with), so the parent runs
exactly as Megatron-Core runs it, at any TP size. Everything is [seq, batch, hidden].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import forward


@dataclass
class ParentActivations:
    h_in: list[torch.Tensor]  # L + 1 entries
    h_mid: list[torch.Tensor]  # L entries
    rope: object

    def block_io(self, layer: int, subblock: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) of a trained layer: attention (and pair) variants start at h_in[i],
        FFN variants at h_mid[i]; both target the parent block's output h_in[i + 1]."""
        x = self.h_mid[layer] if subblock == "ffn" else self.h_in[layer]
        return x, self.h_in[layer + 1]


@torch.no_grad()
def parent_activations(model, tokens: torch.Tensor, layers: int | None = None) -> ParentActivations:
    """Run the parent on tokens [batch, seq] through its first `layers` layers (default all)."""
    decoder_layers = model.decoder.layers
    n = len(decoder_layers) if layers is None else layers
    mids: list[torch.Tensor | None] = [None] * n

    def capture(i):
        def hook(_module, args):
            mids[i] = args[0].detach()
        return hook

    handles = [decoder_layers[i].pre_mlp_layernorm.register_forward_pre_hook(capture(i)) for i in range(n)]
    try:
        h = forward.embed(model, tokens)
        rope = forward.rotary(model, h.shape[0])
        h_in = [h]
        for i in range(n):
            h, _ = decoder_layers[i](h, attention_mask=None, rotary_pos_emb=rope)
            h_in.append(h.detach())
    finally:
        for handle in handles:
            handle.remove()
    if any(m is None for m in mids):
        raise RuntimeError("a parent layer has no FFN norm to capture; BLD needs a parent with full blocks")
    return ParentActivations(h_in, mids, rope)
