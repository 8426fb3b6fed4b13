"""Whole-model evaluation against the parent: the same metrics as replace-1-block scoring.

GKD and the final report score whole architectures with `evaluate_model`; the
additivity benchmark compares `score_architecture` with summed 1-block scores.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from ..arch import ModelConfig
from ..model import forward
from .library import LibraryError, VariantWeights
from ..model.metrics import ALL_METRICS, MetricSums, Reference
from .replace import model_device, replace_subblock, split_batch


def _whole(model) -> None:
    """The parent's references are reused over whole-model evaluations (PP 1); at PP `evaluate_model` runs
    the parent alongside the child, and GKD evaluates at PP itself."""
    if not (getattr(model, "pre_process", True) and getattr(model, "post_process", True)):
        raise ValueError("this is a whole-model evaluation (pipeline-parallel size 1) and the model is one "
                         "pipeline stage: evaluate at PP 1, or give evaluate_model both models' stages")


@torch.no_grad()
def parent_references(parent_model, batches: Iterable[torch.Tensor]) -> list[Reference]:
    """The parent's side of `evaluate_model` for each batch, to reuse over many children."""
    _whole(parent_model)
    parent_model.eval()
    device = model_device(parent_model)
    return [Reference.from_logits(forward.logits(parent_model, split_batch(w, device)[0]), split_batch(w, device)[1])
            for w in batches]


@torch.no_grad()
def evaluate_model(model, parent_model, batches: Iterable[torch.Tensor],
                   references: Sequence[Reference] | None = None) -> dict[str, float]:
    """KL(parent || model), LM loss, top-1 agreement with the parent and next-token accuracy.

    `batches` yields held-out windows [batch, seq + 1]; both models run on the same
    TP group and return vocab-parallel logits. `references` (from `parent_references`
    on the same batches) saves the parent's forwards. Token-weighted means, plus "tokens".

    Under pipeline parallelism both models are this rank's stage of the same split (built after
    `init_distributed` with the same PP and stage layers): each batch runs through the stages
    (`model.pipe.PipeStage`), the parent's pass first, the last stage computes the metrics and
    every rank returns them. `references` are for whole models only.
    """
    if not (getattr(model, "pre_process", True) and getattr(model, "post_process", True)):  # a pipeline stage
        from ..model.pipe import PipeStage

        if references is not None:
            raise ValueError("references are for whole models (PP 1); under pipeline parallelism the parent "
                             "runs alongside the child")
        return _evaluate_stages(PipeStage(model), PipeStage(parent_model), batches)
    _whole(model), _whole(parent_model)
    was_training = model.training, parent_model.training
    model.eval(), parent_model.eval()
    sums = MetricSums()
    try:
        for i, window in enumerate(batches):
            tokens, targets = split_batch(window, model_device(model))
            if references is not None:
                ref = references[i]
            else:
                ref = Reference.from_logits(forward.logits(parent_model, tokens), targets)
            sums.add(forward.logits(model, tokens), ref)
    finally:
        model.train(was_training[0]), parent_model.train(was_training[1])
    return dict(sums.means(ALL_METRICS), tokens=sums.tokens)


def assemble_layer(parent_cfg: ModelConfig, parent_layer: Mapping[str, torch.Tensor], child_cfg: ModelConfig, i: int,
                   variant_weights: VariantWeights) -> dict[str, torch.Tensor]:
    """Canonical tensors of the child's layer `i`: the parent's layer `i` (`parent_layer`) with every
    subblock the child changes taken from `variant_weights(i, name)` (None: the parent's own variant)."""
    block, own = child_cfg.blocks[i], parent_cfg.blocks[i]
    layer = dict(parent_layer)
    for v, parent_v in ((block.attention, own.attention), (block.ffn, own.ffn)):
        w = variant_weights(i, v.name)
        if w is None and v != parent_v:
            raise LibraryError(f"no weights for layer {i} variant {v.name}: the library lacks that entry")
        if w is not None:
            layer = replace_subblock(child_cfg, i, layer, v.name, w)
    return layer


def _stage_logits(stage, tokens: torch.Tensor):
    """This stage's part of one whole forward: vocab-parallel logits on the last stage, None on the others
    (which send their hidden states on)."""
    model = stage.model
    if stage.is_first:
        h = forward.embed(model, tokens)
    else:
        h = stage.recv((tokens.shape[1], tokens.shape[0], model.puzzle_config.hidden_size))
    h = forward.run_layers(model, h)
    if not stage.is_last:
        stage.send(h)
        return None
    return forward.head(model, h)


def _evaluate_stages(child, parent, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """`evaluate_model` over pipeline stages (`child`, `parent`: PipeStages of the same split)."""
    if (child.size, child.rank, list(child.layers)) != (parent.size, parent.rank, list(parent.layers)):
        raise ValueError(f"the child's stage holds layers {list(child.layers)} and the parent's "
                         f"{list(parent.layers)}: build both with the same pipeline split")
    models = child.model, parent.model
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    sums = MetricSums()
    try:
        for window in batches:
            tokens, targets = split_batch(window, model_device(child.model))
            parent_logits = _stage_logits(parent, tokens)  # every stage runs the two passes in this order
            child_logits = _stage_logits(child, tokens)
            if child.is_last:
                sums.add(child_logits, Reference.from_logits(parent_logits, targets))
    finally:
        for m, t in zip(models, was_training):
            m.train(t)
    result = dict(sums.means(ALL_METRICS), tokens=sums.tokens) if child.is_last else None
    return child.gather(result)[-1]  # the last stage's metrics, on every stage


def assemble(parent_cfg: ModelConfig, parent_tensors: Mapping[str, torch.Tensor], child_cfg: ModelConfig,
             variant_weights: VariantWeights) -> dict[str, torch.Tensor]:
    """Canonical tensors of a child: non-block weights and unchanged subblocks from the parent,
    every other subblock from `variant_weights(layer, name)` (which may return None for the
    parent's own variant of a layer, meaning the parent's weights). A whole copy: for small models
    and tests; `score_architecture` builds a child one layer at a time."""
    out = {k: v for k, v in parent_tensors.items() if not k.startswith("model.layers.")}
    for i in range(child_cfg.num_layers):
        prefix = f"model.layers.{i}."
        layer = {k: v for k, v in parent_tensors.items() if k.startswith(prefix)}
        out.update(assemble_layer(parent_cfg, layer, child_cfg, i, variant_weights))
    return out


def build_child(parent, child_cfg: ModelConfig, variant_weights: VariantWeights):
    """The child model of `child_cfg` at the parent's TP size, filled one layer at a time from the parent's
    layer (gathered over TP when read) and `variant_weights`: no whole copy of either model is made.
    Collective over TP."""
    from ..convert.megatron_layout import CanonicalView, load_layers
    from ..model.gpt import build_model

    child = build_model(child_cfg)
    view = CanonicalView(parent)
    load_layers(child, view.non_block(),
                lambda i: assemble_layer(parent.puzzle_config, view.layer(i), child_cfg, i, variant_weights))
    return child


def score_architecture(parent, child_cfg: ModelConfig, weights, batches: Iterable[torch.Tensor],
                       references: Sequence[Reference] | None = None) -> dict[str, float]:
    """Build the child (`weights`: its full canonical tensors, or a `variant_weights` callable
    applied over the parent's, see `build_child`), and evaluate it against `parent` on `batches`
    (see `evaluate_model`)."""
    from ..convert.megatron_layout import load_canonical
    from ..model.gpt import build_model

    if callable(weights):
        child = build_child(parent, child_cfg, weights)
    else:
        child = build_model(child_cfg)
        load_canonical(child, weights)
    try:
        return evaluate_model(child, parent, batches, references)
    finally:
        del child
