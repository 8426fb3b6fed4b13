"""Forward passes in pieces: embed, run a range of layers, head.

BLD, scoring and GKD need the hidden states between blocks and need to restart a
forward from any layer (replace-1-block scoring reruns only layers l..L). These
helpers call the GPTModel's own submodules in the order its forward does, so the
full-model logits are the same as `GPTModel.forward`.

Shapes follow Megatron-Core: hidden states are [seq, batch, hidden]; logits from
`head` are vocab-parallel [batch, seq, vocab / tp].
"""

from __future__ import annotations

import torch


def embed(model, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [batch, seq] -> hidden [seq, batch, hidden]."""
    return model.embedding(input_ids=tokens, position_ids=None)


def rotary(model, seq_len: int):
    return model.rotary_pos_emb(seq_len)


def run_layers(model, hidden: torch.Tensor, start: int = 0, end: int | None = None, *, rope=None,
               collect: bool = False, layers=None):
    """Run decoder layers [start, end) on `hidden`.

    Returns the output hidden states, and with `collect=True` also the list of each
    layer's output. `layers` overrides modules by index (e.g. {3: candidate_layer}),
    which is how a replaced block is scored without building a new model.
    """
    decoder = model.decoder
    end = len(decoder.layers) if end is None else end
    rope = rotary(model, hidden.shape[0]) if rope is None else rope
    recompute = torch.is_grad_enabled() and model.config.recompute_granularity == "full"
    outs = []
    for i in range(start, end):
        layer = layers[i] if layers is not None and i in layers else decoder.layers[i]
        if recompute:
            hidden = _recomputed(layer, hidden, rope)
        else:
            hidden, _ = layer(hidden, attention_mask=None, rotary_pos_emb=rope)
        if collect:
            outs.append(hidden)
    return (hidden, outs) if collect else hidden


def _recomputed(layer, hidden: torch.Tensor, rope) -> torch.Tensor:
    """One layer whose activations are dropped after the forward and recomputed in the backward
    (RuntimeOptions.recompute): only the layer's input is kept. Megatron-Core does this inside
    TransformerBlock.forward, which `run_layers` bypasses, so it is done here per layer. The
    output stays in the autograd graph, so losses on collected hidden states (GKD's cosine
    term) still reach the weights. Dropout is 0 in these models: no RNG state to replay."""
    def run(h):
        return layer(h, attention_mask=None, rotary_pos_emb=rope)[0]

    if layer.config.fp8:  # FP8 scaling state must be replayed by Transformer Engine's own checkpoint
        from megatron.core import tensor_parallel
        from megatron.core.extensions.transformer_engine import te_checkpoint
        from megatron.core.parallel_state import get_tensor_model_parallel_group

        return te_checkpoint(run, False, tensor_parallel.random.get_cuda_rng_tracker,
                             get_tensor_model_parallel_group(), hidden)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(run, hidden, use_reentrant=False)


def head(model, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + output layer: hidden [seq, batch, hidden] -> vocab-parallel logits [batch, seq, vocab/tp]."""
    if model.decoder.final_layernorm is not None:
        hidden = model.decoder.final_layernorm(hidden)
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(hidden, weight=weight)
    return logits.transpose(0, 1).contiguous()


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits [batch, seq, vocab/tp] of a whole forward."""
    return head(model, run_layers(model, embed(model, tokens)))


def gather_vocab(logits_parallel: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from vocab-parallel shards (for tests and small evals only)."""
    from megatron.core import tensor_parallel

    return tensor_parallel.gather_from_tensor_model_parallel_region(logits_parallel)


def full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return gather_vocab(logits(model, tokens))


# --------------------------------------------------------------------------- whole-stage forward (pipeline parallel)

class LayerOutputs:
    """Collects the output hidden state of each decoder layer of a GPTModel (this pipeline
    stage's layers) while the model runs its own `forward`, through Megatron-Core's
    TransformerBlock (its recompute included) and without copying its loop.

    Layer i's output is taken as the input of layer i + 1 (a forward pre-hook), the last
    layer's as the input of the final norm (last stage) or the decoder's output (other
    stages). Inputs, not outputs: under full recompute each layer runs inside a checkpoint
    with autograd off, and only the checkpoint's result, the next layer's input, carries
    the graph a loss on it needs. Hooks collect only inside `with collector:`, so the
    recomputation during the backward leaves the list alone.
    """

    def __init__(self, model):
        decoder = model.decoder
        self.hidden: list[torch.Tensor] = []
        self._on = False
        self._handles = []
        layers = list(decoder.layers)
        for layer in layers[1:]:
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        if layers:
            if decoder.final_layernorm is not None:
                self._handles.append(decoder.final_layernorm.register_forward_pre_hook(self._norm_hook))
            else:
                self._handles.append(decoder.register_forward_hook(self._out_hook))

    def _pre_hook(self, module, args, kwargs):
        if self._on:
            self.hidden.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    def _norm_hook(self, module, args):
        if self._on:
            self.hidden.append(args[0])

    def _out_hook(self, module, args, output):
        if self._on:
            self.hidden.append(output[0] if isinstance(output, tuple) else output)

    def __enter__(self):
        self.hidden = []
        self._on = True
        return self

    def __exit__(self, *exc):
        self._on = False

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


def stage_forward(model, tokens: torch.Tensor, input_tensor: torch.Tensor | None = None,
                  collector: LayerOutputs | None = None):
    """This pipeline stage's forward through GPTModel.forward: vocab-parallel logits
    [batch, seq, vocab/tp] on the last stage, hidden states [seq, batch, hidden] on the others.

    `input_tensor` is the previous stage's output (None on the first stage, which embeds
    `tokens`); with a `collector`, each of the stage's layer outputs is in `collector.hidden`.
    """
    model.set_input_tensor(input_tensor)
    ctx = collector if collector is not None else _null()
    with ctx:
        return model(input_ids=tokens, position_ids=None, attention_mask=None)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
