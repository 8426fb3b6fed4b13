"""Replace-1-block scoring: put one variant into the otherwise unchanged parent and compare.

For each batch of held-out tokens the parent runs once, keeping the hidden state
entering every layer and its logits. An entry for layer l (the variant in one
subblock, the parent's weights in the other) is a standalone layer; only layers
l..L rerun, from the parent's cached input of layer l, with the entry in place
of layer l. Entry layers are built once and reused over all batches; at most
`max_entries` are alive at a time (one parent pass per batch per group of them).

Under pipeline parallelism the parent is this rank's stage (`model.pipe.PipeStage`): the
parent pass runs stage by stage, each caching the inputs of its own layers; an entry of
layer l is built and run on the stage owning l, which sends its hidden state on; later
stages continue with their parent layers and the last stage computes logits and metrics.
Every stage walks a group's entries in the same order, so the sends pair up. Results
(metrics) exist on the last stage only.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

import torch

from ..arch import AttentionVariant, BlockConfig, ModelConfig, variant_from_name
from ..arch.shapes import variant_shapes
from ..model import forward
from .library import LibraryError, VariantWeights
from ..model.metrics import ALL_METRICS, MetricSums, Reference

log = logging.getLogger(__name__)

Entry = tuple[int, str]  # (layer, variant name or "attn_...+ffn_..." pair)
_OWNED = {"attention": ("input_layernorm.", "self_attn."), "ffn": ("post_attention_layernorm.", "mlp.")}


def split_batch(window: torch.Tensor, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A held-out window [batch, seq + 1] -> (inputs [batch, seq], next-token targets [batch, seq]) on `device`."""
    if device is not None:
        window = window.to(device, non_blocking=True)
    return window[:, :-1], window[:, 1:]


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def entry_block(cfg: ModelConfig, layer: int, name: str) -> BlockConfig:
    """The parent's block of `layer` with the subblock(s) named by `name` replaced."""
    block = cfg.blocks[layer]
    attn, ffn = block.attention, block.ffn
    for part in name.split("+"):
        v = variant_from_name(part)
        if isinstance(v, AttentionVariant):
            attn = v
        else:
            ffn = v
    return BlockConfig(attn, ffn)


def _subblock(name: str) -> str:
    return "attention" if name.startswith("attn_") else "ffn"


def replace_subblock(cfg: ModelConfig, layer: int, tensors: dict, name: str, weights: dict) -> dict:
    """Canonical tensors of `layer` with subblock `name` swapped for `weights` (checked against its shapes)."""
    prefix = f"model.layers.{layer}."
    owned = tuple(prefix + p for p in _OWNED[_subblock(name)])
    want = variant_shapes(cfg, layer, variant_from_name(name))
    got = {k: tuple(v.shape) for k, v in weights.items() if k.startswith(owned)}
    if got != want:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise LibraryError(
            f"layer {layer} variant {name}: weights do not match the variant (missing {missing[:3]}, "
            f"unexpected {extra[:3]}, wrong shape {wrong[:3]}); rebuild that library entry"
        )
    out = {k: v for k, v in tensors.items() if not k.startswith(owned)}
    out.update({k: weights[k] for k in want})
    return out


class ReplaceScorer:
    """Scores (layer, variant) entries of one parent model against the parent itself."""

    def __init__(self, parent, variant_weights: VariantWeights, max_entries: int = 64):
        from ..model.pipe import PipeStage

        self.parent = parent.eval()
        self.cfg: ModelConfig = parent.puzzle_config
        self.stage = PipeStage(parent)
        self.variant_weights = variant_weights
        self.max_entries = max(1, int(max_entries))
        self._parent_layer: dict[int, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ entries
    def parent_layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        from ..convert.megatron_layout import block_canonical

        if layer not in self._parent_layer:
            self._parent_layer[layer] = block_canonical(
                self.parent.decoder.layers[self.stage.local(layer)], self.cfg, layer, self.cfg.blocks[layer])
        return self._parent_layer[layer]

    def entry_tensors(self, layer: int, name: str) -> dict[str, torch.Tensor]:
        tensors = self.parent_layer_tensors(layer)
        parent_block = self.cfg.blocks[layer]
        for part in name.split("+"):
            w = self.variant_weights(layer, part)
            if w is None:  # no library entry: only the parent's own variant may fall back to the parent's weights
                own = parent_block.attention.name if _subblock(part) == "attention" else parent_block.ffn.name
                if part != own:
                    raise LibraryError(f"the library has no weights for layer {layer} variant {part}")
                continue
            tensors = replace_subblock(self.cfg, layer, tensors, part, w)
        return tensors

    def is_parent(self, layer: int, name: str, tensors: dict) -> bool:
        """True when the entry is the parent's own block with the parent's exact weights."""
        ref = self.parent_layer_tensors(layer)
        return (entry_block(self.cfg, layer, name) == self.cfg.blocks[layer] and tensors.keys() == ref.keys()
                and all(torch.equal(tensors[k], ref[k]) for k in ref))

    def build_entry(self, layer: int, name: str):
        """A standalone layer holding the entry block of `layer`, or None when it equals the parent's."""
        from ..convert.megatron_layout import load_block
        from ..model.gpt import build_layer

        tensors = self.entry_tensors(layer, name)
        if self.is_parent(layer, name, tensors):
            return None
        block = entry_block(self.cfg, layer, name)
        module = build_layer(self.cfg, block, layer_number=layer + 1)
        load_block(module, self.cfg, layer, block, tensors)
        return module.eval()

    def build_group(self, group: Sequence[Entry]) -> tuple[dict, set]:
        """({entry: layer module} of `group`'s entries held on this stage, the entries that are the
        parent's own block with its own weights, on every stage: never rerun, their logits are the
        parent's). A bad library entry raises on every stage alike."""
        built, error = {}, None
        for entry in group:
            if entry[0] in self.stage.layers:
                try:
                    built[entry] = self.build_entry(*entry)
                except LibraryError as e:
                    error = str(e)
                    break
        answers = self.stage.gather((error, [e for e, m in built.items() if m is None]))
        errors = [err for err, _ in answers if err]
        if errors:
            raise LibraryError(errors[0])
        same = {tuple(e) for _, parents in answers for e in parents}
        return {e: m for e, m in built.items() if m is not None}, same

    # ------------------------------------------------------------------ the parent pass
    def parent_pass(self, tokens: torch.Tensor, targets: torch.Tensor):
        """(inputs of this stage's layers, rope, parent logits, Reference) of one batch: computed once,
        reused by every entry. Logits and Reference are None except on the last pipeline stage."""
        st = self.stage
        rope = forward.rotary(self.parent, tokens.shape[1])
        h0 = forward.embed(self.parent, tokens) if st.is_first else st.recv(self._shape(tokens))
        out, outs = forward.run_layers(self.parent, h0, rope=rope, collect=True)
        inputs = [h0] + outs[:-1]
        if not st.is_last:
            st.send(out)
            return inputs, rope, None, None
        logits = forward.head(self.parent, out)
        return inputs, rope, logits, Reference.from_logits(logits, targets)

    def _shape(self, tokens: torch.Tensor) -> tuple[int, int, int]:
        return tokens.shape[1], tokens.shape[0], self.cfg.hidden_size

    def entry_logits(self, layer: int, module, inputs, rope, tokens: torch.Tensor | None = None):
        """Logits with `module` in place of `layer` (last stage; None on the others, which run their part
        and send it on). `inputs` are this stage's from `parent_pass`; `tokens` give the shape received."""
        st = self.stage
        if layer in st.layers:
            i = st.local(layer)
            h = forward.run_layers(self.parent, inputs[i], start=i, rope=rope, layers={i: module})
        elif layer < st.offset:
            h = forward.run_layers(self.parent, st.recv(self._shape(tokens)), rope=rope)
        else:
            return None  # a later stage starts this entry
        if not st.is_last:
            st.send(h)
            return None
        return forward.head(self.parent, h)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, entries: Sequence[Entry], batches: Iterable[torch.Tensor], *, parent_metrics: bool = True,
              on_done: Callable[[Entry, dict], None] | None = None, progress: bool = True):
        """Metrics (token-weighted means of ALL_METRICS, plus "tokens") of every entry; and the parent's own.

        `batches` yields held-out windows [batch, seq + 1] and must be re-iterable (it is read
        once per group of entries). `on_done(entry, metrics)` runs as each entry finishes
        (the stage caches scores there). Returns (scores by entry, parent metrics or None);
        under pipeline parallelism only the last stage has metrics (the others return ({}, None)
        and never call `on_done`). Call on every stage with the same entries.
        """
        from tqdm.auto import tqdm

        entries = list(entries)
        batches = list(batches) if not isinstance(batches, (list, tuple)) else batches
        groups = [entries[i : i + self.max_entries] for i in range(0, len(entries), self.max_entries)]
        if not groups and parent_metrics:
            groups = [[]]
        last = self.stage.is_last
        results: dict[Entry, dict] = {}
        parent_sums = MetricSums() if parent_metrics else None
        bar = tqdm(total=len(entries) * len(batches), unit="variant-batch", desc="score",
                   disable=not progress or None)
        for gi, group in enumerate(groups):
            modules, same = self.build_group(group)
            sums = {entry: MetricSums() for entry in group}
            for window in batches:
                tokens, targets = split_batch(window, model_device(self.parent))
                inputs, rope, parent_logits, ref = self.parent_pass(tokens, targets)
                if gi == 0 and parent_sums is not None and last:
                    parent_sums.add(parent_logits, ref)
                for entry in group:
                    if entry in same:
                        logits = parent_logits
                    else:
                        logits = self.entry_logits(entry[0], modules.get(entry), inputs, rope, tokens)
                    if last:
                        sums[entry].add(logits, ref)
                    bar.update(1)
            if last:
                for entry in group:
                    results[entry] = dict(sums[entry].means(ALL_METRICS), tokens=sums[entry].tokens)
                    if on_done is not None:
                        on_done(entry, results[entry])
            del modules
        bar.close()
        parent = None
        if parent_sums is not None and last:
            parent = dict(parent_sums.means(ALL_METRICS), tokens=parent_sums.tokens)
        return results, parent
