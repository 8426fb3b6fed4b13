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
