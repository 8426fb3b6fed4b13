"""Model checkpoints: Megatron-Core distributed checkpoints plus the model config.

A checkpoint directory holds Megatron-Core's sharded tensors (loadable at any
tensor-parallel size), `model_config.json` (the `ModelConfig`, block configs
included) and a `done` marker. All ranks write into `.<name>.tmp`; rank 0 renames it
into place once every rank has finished, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ..arch import ModelConfig
from ..utils.io import DONE_MARKER, atomic_write_json, is_done, move_dir_into_place
from .parallel import barrier, is_rank0

log = logging.getLogger(__name__)
CONFIG_NAME = "model_config.json"
EXTRA_NAME = "extra.json"


def save(model, path: str | Path, extra: dict[str, Any] | None = None, extra_state: dict[str, Any] | None = None) -> Path:
    """Save `model` (and optional sharded extra state, e.g. an optimizer's) to `path` atomically.

    `extra` is small JSON metadata (step, tokens seen, ...).
    `extra_state` is a dict of ShardedTensors / plain objects merged into the
    sharded state dict under the key `extra.` (e.g. optimizer state via Megatron-Core).
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    sharded = model.sharded_state_dict()
    if extra_state:
        sharded.update({f"extra.{k}": v for k, v in extra_state.items()})
    dist_checkpointing.save(sharded, str(tmp))
    barrier()
    if is_rank0():
        model.puzzle_config.save(tmp / CONFIG_NAME)
        atomic_write_json(tmp / EXTRA_NAME, extra or {})
        (tmp / DONE_MARKER).write_text("ok\n")
        move_dir_into_place(tmp, path)
    barrier()
    log.info("saved checkpoint %s", path)
    return path


def check(path: str | Path) -> None:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not (path / CONFIG_NAME).exists() or not is_done(path):
        raise ValueError(
            f"{path} is not a complete megatron-puzzle checkpoint (no {CONFIG_NAME} or no '{DONE_MARKER}' marker); "
            "it may be from an interrupted save: rerun the stage that writes it"
        )


def load_config(path: str | Path) -> ModelConfig:
    check(path)
    return ModelConfig.load(Path(path) / CONFIG_NAME)


def load_extra(path: str | Path) -> dict[str, Any]:
    p = Path(path) / EXTRA_NAME
    return json.loads(p.read_text()) if p.exists() else {}


def load_into(model, path: str | Path, extra_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load weights saved by `save` into a built model (any TP size). Returns loaded extra state."""
    from megatron.core import dist_checkpointing

    check(path)
    sharded = _without_absent_extra_state(model.sharded_state_dict(), path)
    if extra_state:
        sharded.update({f"extra.{k}": v for k, v in extra_state.items()})
    # a checkpoint's keys the model does not ask for (Transformer Engine's `_extra_state` in a
    # TE-spec checkpoint read by local specs) are left unread: Megatron's default strictness
    state = dist_checkpointing.load(sharded, str(path))
    extras = {k[len("extra."):]: state.pop(k) for k in list(state) if k.startswith("extra.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return extras


def _without_absent_extra_state(sharded: dict, path: str | Path) -> dict:
    """Drop the `_extra_state` entries (Transformer Engine's FP8 scaling state, e.g.
    `decoder.final_layernorm._extra_state`) that the checkpoint does not hold: a TE-spec model
    asks for them, a local-spec (CPU) checkpoint has none, and a strict load would raise.
    The modules keep their fresh extra state; weights are unaffected."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    asked = {k for k, v in sharded.items() if k.endswith("_extra_state") and hasattr(v, "key")}
    if not asked:
        return sharded
    meta = load_sharded_metadata(str(path))  # objects are listed per shard: "<key>/shard_<i>_<n>"
    saved = {getattr(v, "key", k.split("/shard_")[0]) for k, v in meta.items()}
    return {k: v for k, v in sharded.items() if k not in asked or v.key in saved}


def load(path: str | Path, opts=None):
    """Build the model described by the checkpoint and load its weights (on the current TP group)."""
    from .gpt import build_model

    cfg = load_config(path)
    model = build_model(cfg, opts)
    load_into(model, path)
    return model
