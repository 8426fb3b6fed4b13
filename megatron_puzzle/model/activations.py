"""The parent's hidden states at each layer, handed out one layer at a time.

BLD and calibration need, per layer i of the parent:
- `h_in[i]`: the layer's input (= output of layer i-1; `h_in[L]` is the last output),
- `h_mid[i]`: the hidden states after the attention subblock (residual added), i.e.
  the input of the FFN subblock.

A parent block's output is `h_in[i + 1]`; the FFN subblock alone maps `h_mid[i]`
to `h_in[i + 1]`. `h_mid` is captured by a forward pre-hook on each layer's
`pre_mlp_layernorm` (the module the FFN subblock starts with), so the parent runs
exactly as Megatron-Core runs it, at any TP size. Everything is [seq, batch, hidden].

`stream_parent` yields one layer's states at a time and keeps nothing of the
layers before, so its memory does not grow with the number of layers;
`parent_activations` keeps every layer's (tests and small tools only).

Under pipeline parallelism `model` is this rank's stage: `stream_parent` receives the
previous stage's output (the first stage embeds), yields the states of the stage's own
layers (global layer numbers), and sends its last output on to the next stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from . import forward


@dataclass
class LayerActivations:
    """One parent layer's input, post-attention state and output for one batch."""

    layer: int
    h_in: torch.Tensor
    h_mid: torch.Tensor
    h_out: torch.Tensor
    rope: object

    def io(self, subblock: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) of a trained layer: attention (and pair) variants start at h_in,
        FFN variants at h_mid; both target the parent block's output."""
        return (self.h_mid if subblock == "ffn" else self.h_in), self.h_out


@dataclass
class ParentActivations:
    h_in: list[torch.Tensor]  # L + 1 entries
    h_mid: list[torch.Tensor]  # L entries
    rope: object

    def block_io(self, layer: int, subblock: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.h_mid[layer] if subblock == "ffn" else self.h_in[layer]
        return x, self.h_in[layer + 1]


@torch.no_grad()
def stream_parent(model, tokens: torch.Tensor, end: int | None = None, stage=None) -> Iterator[LayerActivations]:
    """Run the parent on tokens [batch, seq] through layers [0, end), yielding each layer's states
    as it is reached. The caller's code between yields runs with gradients enabled.

    Pipeline parallel (`stage`: the model's `pipe.PipeStage`, made here when None): every stage
    calls it for the same batches; a stage before the last runs all its layers (the next stage
    waits for their output) and `end` only stops the last stage early. Exhaust the iterator:
    the send to the next stage happens after the last yield."""
    from .pipe import PipeStage

    st = PipeStage(model) if stage is None else stage
    decoder_layers = model.decoder.layers
    n = len(decoder_layers)
    if end is not None and st.is_last:
        n = max(0, min(n, end - st.offset))
    mid: list[torch.Tensor] = []

    def capture(_module, args):
        mid.append(args[0].detach())

    if st.is_first:
        h = forward.embed(model, tokens)
    else:
        h = st.recv((tokens.shape[1], tokens.shape[0], model.puzzle_config.hidden_size))
    rope = forward.rotary(model, h.shape[0])
    for i in range(n):
        handle = decoder_layers[i].pre_mlp_layernorm.register_forward_pre_hook(capture)
        try:
            out, _ = decoder_layers[i](h, attention_mask=None, rotary_pos_emb=rope)
        finally:
            handle.remove()
        if not mid:
            raise RuntimeError("a parent layer has no FFN norm to capture; BLD needs a parent with full blocks")
        acts = LayerActivations(st.offset + i, h, mid.pop(), out.detach(), rope)
        yield acts
        h = acts.h_out
        del acts
    if not st.is_last:
        st.send(h)


def parent_activations(model, tokens: torch.Tensor, layers: int | None = None) -> ParentActivations:
    """Every layer's states at once, through the first `layers` layers (default all)."""
    h_in, h_mid, rope = [], [], None
    for acts in stream_parent(model, tokens, layers):
        if not h_in:
            h_in.append(acts.h_in)
        h_mid.append(acts.h_mid)
        h_in.append(acts.h_out)
        rope = acts.rope
    return ParentActivations(h_in, h_mid, rope)
