"""Canonical (HF DeciLM-named, unsharded) tensors <-> Megatron-Core GPTModel parameters.

Megatron-Core's local layer specs store:
- `linear_qkv` as one matrix, interleaved per KV group: [q_g0 (heads/kv rows of head_dim), k_g0, v_g0, q_g1, ...];
  tensor parallelism splits it evenly along rows (also when kv < tp: Megatron-Core then
  all-gathers and picks its group at run time);
- `linear_fc1` as [gate; up]; each TP rank holds [gate_shard; up_shard];
- column-parallel weights (qkv, fc1, linear replacements, embeddings, output layer) split on
  dim 0, row-parallel weights (linear_proj, linear_fc2) on dim 1; norms are replicated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch
import torch.distributed as dist

from ..arch import ModelConfig

P = "decoder.layers.{i}."


def _split(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} does not split over tensor-parallel size {size}")
    return t.chunk(size, dim=dim)[rank]  # a view: the caller copies it into its parameter


def _qkv_split(cfg: ModelConfig, qkv: torch.Tensor, kv: int):
    d, h = cfg.head_dim, qkv.shape[1]
    g = cfg.num_attention_heads // kv
    t = qkv.view(kv, (g + 2) * d, h)
    q, k, v = t[:, : g * d], t[:, g * d : (g + 1) * d], t[:, (g + 1) * d :]
    return q.reshape(-1, h).clone(), k.reshape(-1, h).clone(), v.reshape(-1, h).clone()


def to_megatron(cfg: ModelConfig, tensors: dict[str, torch.Tensor], tp_rank: int = 0, tp_size: int = 1) -> dict[str, torch.Tensor]:
    """Canonical tensors -> this TP rank's Megatron-Core state dict (no `_extra_state` entries)."""
    col = lambda t: _split(t, 0, tp_rank, tp_size)  # noqa: E731
    out = {"embedding.word_embeddings.weight": col(tensors["model.embed_tokens.weight"]),
           "decoder.final_layernorm.weight": tensors["model.norm.weight"].clone()}
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = col(tensors["lm_head.weight"])
    for i, b in enumerate(cfg.blocks):
        mc = P.format(i=i)
        out.update({mc + k: v for k, v in block_to_megatron(cfg, i, b, tensors, tp_rank, tp_size).items()})
    return out


class TensorSource:
    """Canonical tensors read whole or as a slice along one dimension; a dict of tensors by default.

    The HF checkpoint reader implements the same two methods over the files, so a TP rank reads
    only the rows or columns of its partition (`block_to_megatron` asks for nothing more)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        t = self.tensors[name]
        return t if dim is None else t.narrow(dim, start, (t.shape[dim] if stop is None else stop) - start)


def _source(tensors) -> "TensorSource":
    return tensors if hasattr(tensors, "read") and hasattr(tensors, "shape") else TensorSource(tensors)


def _bounds(n: int, dim: int, rank: int, size: int) -> tuple[int, int]:
    if n % size:
        raise ValueError(f"dimension {dim} of size {n} does not split over tensor-parallel size {size}")
    k = n // size
    return rank * k, (rank + 1) * k


def _qkv_part(cfg: ModelConfig, src, hf: str, rank: int, size: int) -> torch.Tensor:
    """This TP rank's rows of the fused, per-KV-group interleaved qkv matrix, read from q, k and v
    slice by slice (only the rows the rank holds, also when a KV group is split over ranks)."""
    d, heads = cfg.head_dim, cfg.num_attention_heads
    kv = src.shape(hf + "self_attn.k_proj.weight")[0] // d
    g = heads // kv
    per_group = (g + 2) * d
    a, b = _bounds(kv * per_group, 0, rank, size)
    pieces = []
    for grp in range(a // per_group, -(-b // per_group)):
        lo, hi = max(a, grp * per_group) - grp * per_group, min(b, (grp + 1) * per_group) - grp * per_group
        for n, start, rows, base in (("q", 0, g * d, grp * g * d), ("k", g * d, d, grp * d), ("v", (g + 1) * d, d, grp * d)):
            s, e = max(lo, start), min(hi, start + rows)
            if s < e:
                pieces.append(src.read(hf + f"self_attn.{n}_proj.weight", 0, base + s - start, base + e - start))
    return torch.cat(pieces, dim=0)


def block_to_megatron(cfg: ModelConfig, i: int, b, tensors, tp_rank: int = 0,
                      tp_size: int = 1, subblocks: tuple[str, ...] = ("attention", "ffn")) -> dict[str, torch.Tensor]:
    """Canonical tensors of layer `i` built as block `b` -> this TP rank's tensors, named relative to the layer.

    `tensors`: a dict of canonical tensors or a `TensorSource`-like reader; only this rank's
    rows (column-parallel) or columns (row-parallel) of each weight are read from it.
    `subblocks` restricts the result to the attention and/or FFN part (the block library
    stores them apart).
    """
    src = _source(tensors)

    def col(name):
        return src.read(name, 0, *_bounds(src.shape(name)[0], 0, tp_rank, tp_size))

    def row(name):
        return src.read(name, 1, *_bounds(src.shape(name)[1], 1, tp_rank, tp_size))

    hf, out = f"model.layers.{i}.", {}
    if "attention" in subblocks:
        if b.attention.kind != "no_op":
            out["input_layernorm.weight"] = src.read(hf + "input_layernorm.weight")
        if b.attention.kind == "full":
            out["self_attention.linear_qkv.weight"] = _qkv_part(cfg, src, hf, tp_rank, tp_size)
            out["self_attention.linear_proj.weight"] = row(hf + "self_attn.o_proj.weight")
        elif b.attention.kind == "linear":
            out["self_attention.weight"] = col(hf + "self_attn.linear_attn.weight")
    if "ffn" in subblocks:
        if b.ffn.kind != "no_op":
            out["pre_mlp_layernorm.weight"] = src.read(hf + "post_attention_layernorm.weight")
        if b.ffn.kind == "full":
            gate, up = col(hf + "mlp.gate_proj.weight"), col(hf + "mlp.up_proj.weight")
            out["mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
            out["mlp.linear_fc2.weight"] = row(hf + "mlp.down_proj.weight")
        elif b.ffn.kind == "linear":
            out["mlp.weight"] = col(hf + "mlp.linear_mlp.weight")
    return out


def from_megatron(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full (TP 1 or gathered) Megatron-Core state dict -> canonical tensors."""
    s = {k: v.detach().float().cpu() if v.is_floating_point() else v for k, v in state.items() if not k.endswith("_extra_state")}
    out = {"model.embed_tokens.weight": s["embedding.word_embeddings.weight"].clone(),
           "model.norm.weight": s["decoder.final_layernorm.weight"].clone()}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = s["output_layer.weight"].clone()
    for i in range(cfg.num_layers):
        mc = P.format(i=i)
        out.update(block_from_megatron(cfg, i, {k[len(mc):]: v for k, v in s.items() if k.startswith(mc)}))
    return out


def block_from_megatron(cfg: ModelConfig, i: int, layer_state: dict[str, torch.Tensor], b=None) -> dict[str, torch.Tensor]:
    """One layer's full Megatron-Core tensors (names relative to the layer) -> canonical tensors.

    `b` is the layer's BlockConfig (default: `cfg.blocks[i]`); missing subblock tensors are skipped,
    so a layer holding only an attention (or FFN) variant converts too.
    """
    b = cfg.blocks[i] if b is None else b
    hf, s, out = f"model.layers.{i}.", layer_state, {}
    if b.attention.kind != "no_op" and "input_layernorm.weight" in s:
        out[hf + "input_layernorm.weight"] = s["input_layernorm.weight"].clone()
    if b.attention.kind == "full" and "self_attention.linear_qkv.weight" in s:
        q, k, v = _qkv_split(cfg, s["self_attention.linear_qkv.weight"], b.attention.num_kv_heads)
        out.update({hf + "self_attn.q_proj.weight": q, hf + "self_attn.k_proj.weight": k,
                    hf + "self_attn.v_proj.weight": v,
                    hf + "self_attn.o_proj.weight": s["self_attention.linear_proj.weight"].clone()})
    elif b.attention.kind == "linear" and "self_attention.weight" in s:
        out[hf + "self_attn.linear_attn.weight"] = s["self_attention.weight"].clone()
    if b.ffn.kind != "no_op" and "pre_mlp_layernorm.weight" in s:
        out[hf + "post_attention_layernorm.weight"] = s["pre_mlp_layernorm.weight"].clone()
    if b.ffn.kind == "full" and "mlp.linear_fc1.weight" in s:
        gate, up = s["mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({hf + "mlp.gate_proj.weight": gate.clone(), hf + "mlp.up_proj.weight": up.clone(),
                    hf + "mlp.down_proj.weight": s["mlp.linear_fc2.weight"].clone()})
    elif b.ffn.kind == "linear" and "mlp.weight" in s:
        out[hf + "mlp.linear_mlp.weight"] = s["mlp.weight"].clone()
    return out


def load_canonical(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy canonical tensors into a built model on the current TP rank (strict: every parameter is set)."""
    from megatron.core import parallel_state

    cfg = model.puzzle_config
    sd = to_megatron(cfg, tensors, parallel_state.get_tensor_model_parallel_rank(),
                     parallel_state.get_tensor_model_parallel_world_size())
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(sd))
    unexpected = sorted(set(sd) - set(params))
    if missing or unexpected:
        raise KeyError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != sd[name].shape:
                raise ValueError(f"{name}: model expects {tuple(p.shape)}, weights have {tuple(sd[name].shape)}")
            p.copy_(sd[name].to(p.dtype))


def load_layers(model, non_block, layer: Callable[[int], Mapping[str, torch.Tensor]]) -> None:
    """Copy canonical tensors into a built model one layer at a time (`layer(i)` gives layer i's tensors,
    `non_block` the others; dicts, or readers like `TensorSource` that read this TP rank's slices only):
    at most one layer is in flight, sliced to this rank's partition and cast to the parameter's dtype
    as it is copied.

    Under pipeline parallelism `model` is this rank's stage: only its layers are asked for (by global
    index) and only the non-block weights it holds are set (the embedding on the first stage; the final
    norm and output layer on the last, the output layer from the embedding when they are tied).
    `non_block` may also be a callable giving the dict or reader, called only on a stage that holds some."""
    from megatron.core import parallel_state

    from ..model.pipe import PipeStage

    cfg = model.puzzle_config
    rank, size = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    params = {n: p for n, p in model.named_parameters() if not n.startswith("decoder.layers.")}
    if params:
        src = _source(non_block() if callable(non_block) and not hasattr(non_block, "read") else non_block)
        col = lambda n: src.read(n, 0, *_bounds(src.shape(n)[0], 0, rank, size))  # noqa: E731
        sd = {}
        if getattr(model, "pre_process", True):
            sd["embedding.word_embeddings.weight"] = col("model.embed_tokens.weight")
        if getattr(model, "post_process", True):
            sd["decoder.final_layernorm.weight"] = src.read("model.norm.weight")
            if not cfg.tie_word_embeddings:
                sd["output_layer.weight"] = col("lm_head.weight")
            elif not getattr(model, "pre_process", True):  # a last stage's copy of the tied embedding
                sd["output_layer.weight"] = col("model.embed_tokens.weight")
        del src
        if set(sd) != set(params):
            raise KeyError(f"weights do not match the model: missing {sorted(set(params) - set(sd))[:5]}, "
                           f"unexpected {sorted(set(sd) - set(params))[:5]}")
        with torch.no_grad():
            for name, p in params.items():
                if p.shape != sd[name].shape:
                    raise ValueError(f"{name}: model expects {tuple(p.shape)}, weights have {tuple(sd[name].shape)}")
                p.copy_(sd[name].to(p.dtype))
        del sd
    stage = PipeStage(model)
    for i in stage.layers:
        load_block(model.decoder.layers[stage.local(i)], cfg, i, cfg.blocks[i], layer(i))


def _gather_param(p: torch.Tensor, name: str) -> torch.Tensor:
    from megatron.core import parallel_state

    size = parallel_state.get_tensor_model_parallel_world_size()
    if size == 1 or not getattr(p, "tensor_model_parallel", False):
        return p.detach()
    dim = p.partition_dim
    parts = [torch.empty_like(p) for _ in range(size)]
    dist.all_gather(parts, p.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    if name.endswith("mlp.linear_fc1.weight"):  # each rank holds [gate_r; up_r]
        gates, ups = zip(*(t.chunk(2, dim=0) for t in parts))
        return torch.cat(list(gates) + list(ups), dim=0)
    return torch.cat(parts, dim=dim)


def full_state(model) -> dict[str, torch.Tensor]:
    """The model's parameters unsharded (all-gathered over TP), Megatron-named, on every rank."""
    return {n: _gather_param(p, n) for n, p in model.named_parameters()}


class CanonicalView(Mapping):
    """A model's weights as canonical tensors (fp32, host), gathered over TP one layer at a time when read.

    Only the layer last read is kept, so reading the names in order (as the HF writer does)
    never holds more than one layer. Collective over TP: every rank of a TP group must read
    the same names in the same order (`drain` does it on the ranks that write nothing).
    """

    _NON_BLOCK = {"model.embed_tokens.weight": "embedding.word_embeddings.weight",
                  "model.norm.weight": "decoder.final_layernorm.weight", "lm_head.weight": "output_layer.weight"}

    def __init__(self, model):
        from ..arch.shapes import canonical_shapes

        self.model, self.cfg = model, model.puzzle_config
        self.shapes = canonical_shapes(self.cfg)
        self._layer: tuple[int | None, dict[str, torch.Tensor]] = (None, {})

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        if name in self._NON_BLOCK:
            mc = self._NON_BLOCK[name]
            return _gather_param(dict(self.model.named_parameters())[mc], mc).float().cpu()
        return self.layer(int(name.split(".")[2]))[name]

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Every canonical tensor of layer `i` (kept until another layer is read; collective over TP)."""
        if self._layer[0] != i:
            self._layer = (None, {})  # drop the previous layer before gathering the next
            self._layer = (i, block_canonical(self.model.decoder.layers[i], self.cfg, i, self.cfg.blocks[i]))
        return self._layer[1]

    def non_block(self) -> dict[str, torch.Tensor]:
        """The embeddings, final norm and (untied) output layer (collective over TP)."""
        return {n: self[n] for n in self.shapes if not n.startswith("model.layers.")}

    def drain(self) -> None:
        """Read every tensor in order and keep none: the collectives of a rank that does not write."""
        for name in self:
            self[name]
        self._layer = (None, {})


def canonical_state(model) -> dict[str, torch.Tensor]:
    """The model's weights as canonical tensors (fp32, CPU), at any TP size: a whole host copy of the
    model, for tests and small models; the stages read a `CanonicalView` instead."""
    return from_megatron(model.puzzle_config, full_state(model))


def load_block(layer, cfg: ModelConfig, i: int, block, tensors: dict[str, torch.Tensor],
               subblocks: tuple[str, ...] = ("attention", "ffn")) -> None:
    """Copy canonical tensors of layer `i` into a standalone layer (from `build_layer`) or a GPTModel's layer.

    Only the named subblocks are set; every parameter of those subblocks must be present.
    """
    from megatron.core import parallel_state

    sd = block_to_megatron(cfg, i, block, tensors, parallel_state.get_tensor_model_parallel_rank(),
                           parallel_state.get_tensor_model_parallel_world_size(), subblocks)
    params = dict(layer.named_parameters())
    wanted = {n for n in params if any(n.startswith(_SUBBLOCK_PREFIXES[s]) for s in subblocks)}
    missing = sorted(wanted - set(sd))
    if missing:
        raise KeyError(f"layer {i}: weights for {missing[:5]} are missing")
    with torch.no_grad():
        for name, t in sd.items():
            if name not in params:
                raise KeyError(f"layer {i}: the layer has no parameter {name} (block {block.name})")
            if params[name].shape != t.shape:
                raise ValueError(f"layer {i}: {name} expects {tuple(params[name].shape)}, got {tuple(t.shape)}")
            params[name].copy_(t.to(params[name].dtype))


_SUBBLOCK_PREFIXES = {"attention": ("input_layernorm.", "self_attention."), "ffn": ("pre_mlp_layernorm.", "mlp.")}


def block_canonical(layer, cfg: ModelConfig, i: int, block,
                    subblocks: tuple[str, ...] = ("attention", "ffn")) -> dict[str, torch.Tensor]:
    """A layer's weights of the named subblocks (gathered over TP, one tensor at a time) as canonical
    tensors of layer `i`."""
    want = tuple(p for s in subblocks for p in _SUBBLOCK_PREFIXES[s])
    state = {n: _gather_param(p, n).float().cpu() for n, p in layer.named_parameters() if n.startswith(want)}
    return block_from_megatron(cfg, i, state, b=block)
