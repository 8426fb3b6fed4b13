"""The block library on disk (docs/formats.md, "Block library").

```
library/
  space.json                   {"layers": [[variant names]...], "pairs": [[pair names]...],
                                "parent_config": {...}, "settings": {...}}
  non_block.safetensors        the parent's embeddings, final norm and LM head
  layer_003/attn_kv1/          one entry: weights.safetensors, stats.json, done
  layer_003/attn_kv1+ffn_768/  a coupled pair (both subblocks' tensors)
```

Entries are written whole into a temporary directory and renamed into place, the
`done` marker inside, so an entry either exists completely or not at all. The
same layout holds the training-free initial weights (RUN/init).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..arch import BlockConfigError, ModelConfig, variant_from_name
from ..arch.shapes import non_block_shapes, variant_shapes
from ..utils.io import DONE_MARKER, atomic_dir, atomic_save_safetensors, atomic_write_json

SPACE_FILE = "space.json"
NON_BLOCK_FILE = "non_block.safetensors"
WEIGHTS_FILE = "weights.safetensors"
STATS_FILE = "stats.json"


class LibraryError(ValueError):
    """A library entry that is missing, corrupt or does not match; the message names the entry."""


def entry_name(layer: int, name: str) -> str:
    return f"layer_{layer:03d}/{name}"


def entry_dir(root: str | Path, layer: int, name: str) -> Path:
    return Path(root) / f"layer_{layer:03d}" / name


def expected_shapes(cfg: ModelConfig, layer: int, name: str) -> dict[str, tuple[int, ...]]:
    """Canonical tensor shapes of a variant (or `attn+ffn` pair) at `layer`."""
    out: dict[str, tuple[int, ...]] = {}
    for part in name.split("+"):
        try:
            out.update(variant_shapes(cfg, layer, variant_from_name(part)))
        except BlockConfigError as e:
            raise LibraryError(f"{entry_name(layer, name)}: {e}") from None
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_entry(root: str | Path, layer: int, name: str, tensors: dict[str, torch.Tensor], stats: dict[str, Any]) -> Path:
    """Write one entry atomically (replacing an unfinished one); returns its directory."""
    path = entry_dir(root, layer, name)
    with atomic_dir(path, overwrite=True) as tmp:
        atomic_save_safetensors(tmp / WEIGHTS_FILE, tensors, metadata={"layer": str(layer), "variant": name})
        full = {"layer": layer, "variant": name, **stats, "sha256": _sha256(tmp / WEIGHTS_FILE)}
        atomic_write_json(tmp / STATS_FILE, full)
    return path


def write_space(root: str | Path, layers: list[list[str]], pairs: list[list[str]], parent_cfg: ModelConfig,
                settings: dict[str, Any]) -> None:
    atomic_write_json(Path(root) / SPACE_FILE, {"layers": layers, "pairs": pairs,
                                                "parent_config": parent_cfg.to_dict(), "settings": settings})


def write_non_block(root: str | Path, cfg: ModelConfig, parent: dict[str, torch.Tensor]) -> None:
    atomic_save_safetensors(Path(root) / NON_BLOCK_FILE, {k: parent[k] for k in non_block_shapes(cfg)})


class Library:
    """Read access to a block library (or an init directory of the same layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        space_file = self.path / SPACE_FILE
        if not space_file.exists():
            raise LibraryError(f"{self.path} is not a block library (no {SPACE_FILE}); run `megatron-puzzle bld` first")
        try:
            meta = json.loads(space_file.read_text())
            self.parent_config = ModelConfig.from_dict(meta["parent_config"])
        except (json.JSONDecodeError, KeyError, TypeError, BlockConfigError) as e:
            raise LibraryError(f"{space_file} is corrupt ({e}); rerun `megatron-puzzle bld`") from None
        self.space: list[list[str]] = meta["layers"]
        self.pairs: list[list[str]] = meta.get("pairs") or [[] for _ in self.space]
        self.settings: dict[str, Any] = meta.get("settings", {})

    # ------------------------------------------------------------------ entries
    def entries(self) -> list[tuple[int, str]]:
        return [(i, n) for i, names in enumerate(self.space) for n in names] + \
               [(i, n) for i, names in enumerate(self.pairs) for n in names]

    def has(self, layer: int, name: str) -> bool:
        return (entry_dir(self.path, layer, name) / DONE_MARKER).exists()

    def _require(self, layer: int, name: str) -> Path:
        path = entry_dir(self.path, layer, name)
        if not (path / DONE_MARKER).exists():
            raise LibraryError(f"library entry {entry_name(layer, name)} is missing or unfinished; "
                               "rerun `megatron-puzzle bld` to complete it")
        return path

    def stats(self, layer: int, name: str) -> dict[str, Any]:
        path = self._require(layer, name) / STATS_FILE
        try:
            stats = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LibraryError(f"library entry {entry_name(layer, name)}: {STATS_FILE} is unreadable ({e}); "
                               "delete the entry and rerun `megatron-puzzle bld`") from None
        if stats.get("layer") != layer or stats.get("variant") != name:
            raise LibraryError(f"library entry {entry_name(layer, name)} holds layer {stats.get('layer')} "
                               f"variant {stats.get('variant')!r}; delete it and rerun `megatron-puzzle bld`")
        return stats

    def load(self, layer: int, name: str) -> dict[str, torch.Tensor]:
        """Canonical tensors of an entry, checked against the variant's shapes."""
        path = self._require(layer, name) / WEIGHTS_FILE
        try:
            tensors = load_file(path)
        except Exception as e:  # safetensors raises its own error types for truncated/garbled files
            raise LibraryError(f"library entry {entry_name(layer, name)}: {WEIGHTS_FILE} is corrupt ({e}); "
                               "delete the entry and rerun `megatron-puzzle bld`") from None
        self._check_shapes(layer, name, {k: tuple(v.shape) for k, v in tensors.items()})
        return tensors

    def _check_shapes(self, layer: int, name: str, shapes: dict[str, tuple[int, ...]]) -> None:
        want = expected_shapes(self.parent_config, layer, name)
        if shapes != want:
            diff = sorted(set(shapes) ^ set(want)) or [k for k in want if shapes[k] != want[k]]
            raise LibraryError(f"library entry {entry_name(layer, name)} does not match its variant "
                               f"(tensors {diff[:4]} differ from {name} at layer {layer}); "
                               "delete the entry and rerun `megatron-puzzle bld`")

    def validate(self, checksums: bool = True) -> None:
        """Check every entry of the space: present, finished, stats readable, tensors of the right
        shapes, and (with `checksums`) the weights file unchanged since it was written."""
        for layer, name in self.entries():
            stats = self.stats(layer, name)
            path = entry_dir(self.path, layer, name) / WEIGHTS_FILE
            try:
                with safe_open(path, framework="pt") as f:
                    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            except Exception as e:
                raise LibraryError(f"library entry {entry_name(layer, name)}: {WEIGHTS_FILE} is corrupt ({e}); "
                                   "delete the entry and rerun `megatron-puzzle bld`") from None
            self._check_shapes(layer, name, shapes)
            if checksums and stats.get("sha256") and _sha256(path) != stats["sha256"]:
                raise LibraryError(f"library entry {entry_name(layer, name)}: {WEIGHTS_FILE} changed after it was "
                                   "written (checksum mismatch); delete the entry and rerun `megatron-puzzle bld`")

    # ------------------------------------------------------------------ children
    def non_block(self) -> dict[str, torch.Tensor]:
        path = self.path / NON_BLOCK_FILE
        if not path.exists():
            raise LibraryError(f"{path} is missing; rerun `megatron-puzzle bld` (it copies the parent's embeddings)")
        return load_file(path)

    def check_child(self, child: ModelConfig) -> None:
        """Refuse a child that does not share the library's parent frame (before any tensor is read)."""
        p = self.parent_config
        for f in ("vocab_size", "hidden_size", "num_attention_heads", "head_dim", "tie_word_embeddings"):
            if getattr(child, f) != getattr(p, f):
                raise LibraryError(f"child config has {f}={getattr(child, f)} but the library's parent has "
                                   f"{getattr(p, f)}; a child shares its parent's frame")
        if child.num_layers != p.num_layers:
            raise LibraryError(f"child has {child.num_layers} layers, the library's parent {p.num_layers}")

    def child_layer(self, child: ModelConfig, i: int) -> dict[str, torch.Tensor]:
        """Canonical tensors of the child's layer `i`: a trained pair when the library has one,
        else the two decoupled variants."""
        b = child.blocks[i]
        if b.name in self.pairs[i] and self.has(i, b.name):
            return self.load(i, b.name)
        return {**self.load(i, b.attention.name), **self.load(i, b.ffn.name)}

    def assemble(self, child: ModelConfig) -> dict[str, torch.Tensor]:
        """Canonical tensors of the whole child (small models and tools; `child_layer` streams)."""
        self.check_child(child)
        out = dict(self.non_block())
        for i in range(child.num_layers):
            out.update(self.child_layer(child, i))
        return out
