"""Read what scoring needs from a block library directory (layout of docs/formats.md).

    library/space.json                         variant names per layer
    library/layer_NNN/<variant>/weights.safetensors + done

Scoring only needs `variant_weights(layer, name) -> canonical tensors`; any callable
with that signature works (tests pass their own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..arch import AttentionVariant, BlockConfigError, variant_from_name
from ..utils.io import is_done, read_json

VariantWeights = Callable[[int, str], dict[str, torch.Tensor]]


class LibraryError(ValueError):
    """A library directory that scoring cannot use; the message names the entry and the fix."""


def entry_dir(library: str | Path, layer: int, name: str) -> Path:
    return Path(library) / f"layer_{layer:03d}" / name


def space_layers(space: Any) -> list[list[str]]:
    """Variant names per layer from `[[...], ...]`, `{"layers": [...]}`, or per-layer `{"attention", "ffn"}` objects."""
    layers = space.get("layers") if isinstance(space, dict) else space
    if not isinstance(layers, list) or not layers:
        raise LibraryError("a search space must be a non-empty list of layers (or an object with a 'layers' list)")
    out = []
    for i, layer in enumerate(layers):
        if isinstance(layer, dict):
            layer = [n for key in ("attention", "ffn") for n in layer.get(key, [])]
        if not isinstance(layer, list) or not all(isinstance(n, str) for n in layer):
            raise LibraryError(f"search space layer {i} must be a list of variant names, got {layer!r}")
        for n in layer:
            try:
                variant_from_name(n.split("+")[0])
            except BlockConfigError as e:
                raise LibraryError(f"search space layer {i}: {e}") from None
        out.append(list(dict.fromkeys(layer)))
    return out


def read_space(library: str | Path) -> list[list[str]]:
    path = Path(library) / "space.json"
    if not path.exists():
        raise LibraryError(f"{path} not found; build the block library first (`megatron-puzzle bld`)")
    return space_layers(read_json(path))


def library_weights(library: str | Path) -> VariantWeights:
    """`variant_weights(layer, name)` reading `library/layer_NNN/<name>/weights.safetensors`."""
    from safetensors.torch import load_file

    def variant_weights(layer: int, name: str) -> dict[str, torch.Tensor]:
        d = entry_dir(library, layer, name)
        if not is_done(d):
            raise LibraryError(f"library entry {d} is missing or unfinished; rerun the library stage for it")
        return load_file(str(d / "weights.safetensors"))

    return variant_weights


def weights_mtime(library: str | Path, layer: int, name: str) -> float | None:
    """When a library entry's weights were written (None when absent), to tell stale cached scores."""
    p = entry_dir(library, layer, name) / "weights.safetensors"
    return p.stat().st_mtime if p.exists() else None


def is_attention(name: str) -> bool:
    return isinstance(variant_from_name(name), AttentionVariant)
