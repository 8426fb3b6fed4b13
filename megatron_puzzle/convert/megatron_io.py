"""HF checkpoints <-> Megatron-Core distributed checkpoints.

`import_hf`: a Llama-family or DeciLM HF checkpoint (safetensors directory or GGUF
file) -> a Megatron-Core checkpoint (loadable at any TP size), with the tokenizer
saved beside it. `export_hf`: a checkpoint -> an HF DeciLM / Nemotron-NAS directory.

Under `torchrun` with N processes and `tp=N`, each rank loads only its shards; in a
single process the model is built at TP 1 (the checkpoint still loads at any TP).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from ..model import checkpoint
from ..utils.errors import InputError
from ..model.gpt import RuntimeOptions, build_model, check_layout, launch_world
from ..model.parallel import init_distributed, is_rank0 as _rank0
from .megatron_layout import CanonicalView, load_layers

log = logging.getLogger(__name__)
TOKENIZER_DIR = "tokenizer"


def import_hf(hf_path: str | Path, out_dir: str | Path, tp: int = 1, overwrite: bool = False, layers: int | None = None,
              dtype: torch.dtype | None = None):
    """Convert an HF checkpoint to a Megatron-Core checkpoint at `out_dir`; returns the built model.

    Each TP rank reads only its rows / columns of each weight, one tensor at a time, and the
    checkpoint keeps the source's dtype (`dtype` None: bf16 stays bf16; GGUF, dequantized: fp32;
    norms are fp32 with Megatron-Core's local specs); a stage loading it in fp32 converts on load.
    With `layers`, only the first `layers` blocks are kept (with the embeddings, final norm and head):
    the quick profile's cut of a parent; the other blocks are never read."""
    from .hf_io import load_tokenizer, open_hf_checkpoint

    hf_path, out_dir = Path(hf_path), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; remove it or choose another output directory")
    reader = open_hf_checkpoint(hf_path)  # every name and shape checked before any work
    cfg = reader.cfg
    if layers is not None:
        if not 1 <= layers <= cfg.num_layers:
            raise InputError(f"parent_layers={layers} but the parent has {cfg.num_layers} layers; "
                             f"choose 1..{cfg.num_layers} (or null for all)")
        cfg = replace(cfg, num_layers=layers, blocks=cfg.blocks[:layers])
    log.info("read %s: %d layers, hidden %d, %d tensors", hf_path, cfg.num_layers, cfg.hidden_size, len(reader.keys()))
    check_layout(cfg, tp=tp, world=launch_world(), what="checkpoint")  # before any process group or model
    init_distributed(tp)
    model = build_model(cfg, RuntimeOptions(dtype=dtype or reader.dtype))
    load_layers(model, reader, lambda i: reader)  # this rank's slice of one tensor read at a time
    log.info("import: %.1f MB of tensor data read on this rank (%s)", reader.bytes_read / 2**20, reader.dtype)
    reader.close()
    tokenizer = None
    try:
        tokenizer = load_tokenizer(hf_path)
    except Exception as e:  # a checkpoint without tokenizer files is still convertible
        log.warning("no tokenizer saved with the checkpoint (%s)", e)
    checkpoint.save(model, out_dir, extra={"source": str(hf_path), **({"parent_layers": layers} if layers else {})})
    if tokenizer is not None and _rank0():
        tmp = out_dir / f".{TOKENIZER_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out_dir / TOKENIZER_DIR)
    return model


def load_checkpoint_tokenizer(ckpt_dir: str | Path):
    """The tokenizer saved beside a checkpoint by `import_hf`, or None."""
    from transformers import AutoTokenizer

    p = Path(ckpt_dir) / TOKENIZER_DIR
    return AutoTokenizer.from_pretrained(p) if p.exists() else None


def export_model(model, out_dir: str | Path, tokenizer=None, dtype: torch.dtype = torch.float32) -> Path | None:
    """Write a built model as an HF DeciLM directory (collective over TP; rank 0 writes)."""
    from .hf_io import write_decilm_hf

    from ..model import parallel

    tensors = CanonicalView(model)  # streamed: one layer gathered at a time, in the order it is written
    if _rank0():
        write_decilm_hf(out_dir, model.puzzle_config, tensors, tokenizer=tokenizer, dtype=dtype)
        return Path(out_dir)
    if parallel.dp_rank() == 0:  # the writer's TP group: take part in its gathers
        tensors.drain()
    return None


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, tp: int = 1, dtype: torch.dtype = torch.float32) -> Path:
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    checkpoint.check(ckpt_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already exists and is not empty; remove it or choose another output directory")
    check_layout(checkpoint.load_config(ckpt_dir), tp=tp, world=launch_world(), what="checkpoint")
    init_distributed(tp)
    model = checkpoint.load(ckpt_dir)
    export_model(model, out_dir, tokenizer=load_checkpoint_tokenizer(ckpt_dir), dtype=dtype)
    return out_dir
