"""Per-layer block configs: the vocabulary every stage shares.

A *block* is one transformer layer: an attention subblock and an FFN subblock.
Each subblock is one *variant*:

- attention: ``full`` with ``num_kv_heads`` KV heads (GQA), ``linear`` (one
  hidden -> hidden matrix, each token attends to itself), or ``no_op``;
- FFN: ``full`` with ``intermediate_size`` channels (SwiGLU), ``linear``, or
  ``no_op``.

Two JSON dialects are read and written:

- HF DeciLM / Nemotron-NAS ``block_configs``: ``n_heads_in_group`` and ``ffn_mult``
  (intermediate size = ``int(2 * ffn_mult * hidden / 3)`` rounded up to 256);
- Megatron-Core's ``HeterogeneousTransformerConfig`` keys: ``num_query_groups`` and
  ``ffn_hidden_size``.

Small models have FFN sizes that no ``ffn_mult`` reproduces (the rule rounds to
256). We always write the exact ``ffn_hidden_size`` beside ``ffn_mult``; readers
(Megatron-Core, our HF modeling code, this module) take ``ffn_hidden_size`` first.
Where the size round-trips through the rule, ``ffn_mult`` is the exact multiplier,
so tools that know only ``ffn_mult`` still build the same model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

Kind = Literal["full", "linear", "no_op"]
_KINDS = ("full", "linear", "no_op")


class BlockConfigError(ValueError):
    """A block config list that cannot describe a model; the message names layer and field."""


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int, multiple: int = 256) -> int:
    """The DeciLM / Megatron-Core / vLLM rule: int(2*mult*hidden/3) rounded up to `multiple`."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return size if size % multiple == 0 else size + multiple - size % multiple


def intermediate_size_to_ffn_mult(size: int, hidden_size: int) -> tuple[float, bool]:
    """Return (ffn_mult, exact). `exact` says whether the rule maps ffn_mult back to `size`."""
    mult = round(1.5 * size / hidden_size, 6)
    for candidate in (mult, 1.5 * size / hidden_size):
        if ffn_mult_to_intermediate_size(candidate, hidden_size) == size:
            return candidate, True
    return mult, False


@dataclass(frozen=True)
class AttentionVariant:
    kind: Kind = "full"
    num_kv_heads: int | None = None  # set for "full", None otherwise

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise BlockConfigError(f"attention kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "full" and (self.num_kv_heads is None or self.num_kv_heads <= 0):
            raise BlockConfigError(f"full attention needs num_kv_heads > 0, got {self.num_kv_heads}")
        if self.kind != "full" and self.num_kv_heads is not None:
            raise BlockConfigError(f"{self.kind} attention has no KV heads (got {self.num_kv_heads})")

    @property
    def name(self) -> str:
        """Stable short name, used as the library key: attn_kv3, attn_linear, attn_no_op."""
        return f"attn_kv{self.num_kv_heads}" if self.kind == "full" else f"attn_{self.kind}"

    @classmethod
    def from_name(cls, name: str) -> "AttentionVariant":
        if name.startswith("attn_kv"):
            return cls("full", int(name[len("attn_kv"):]))
        if name in ("attn_linear", "attn_no_op"):
            return cls(name[len("attn_"):])
        raise BlockConfigError(f"unknown attention variant name {name!r} (expected attn_kvN, attn_linear, attn_no_op)")


@dataclass(frozen=True)
class FFNVariant:
    kind: Kind = "full"
    intermediate_size: int | None = None  # set for "full", None otherwise

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise BlockConfigError(f"ffn kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "full" and (self.intermediate_size is None or self.intermediate_size <= 0):
            raise BlockConfigError(f"full FFN needs intermediate_size > 0, got {self.intermediate_size}")
        if self.kind != "full" and self.intermediate_size is not None:
            raise BlockConfigError(f"{self.kind} FFN has no intermediate size (got {self.intermediate_size})")

    @property
    def name(self) -> str:
        """Stable short name, used as the library key: ffn_1536, ffn_linear, ffn_no_op."""
        return f"ffn_{self.intermediate_size}" if self.kind == "full" else f"ffn_{self.kind}"

    @classmethod
    def from_name(cls, name: str) -> "FFNVariant":
        rest = name[len("ffn_"):] if name.startswith("ffn_") else None
        if rest in ("linear", "no_op"):
            return cls(rest)
        if rest is not None and rest.isdigit():
            return cls("full", int(rest))
        raise BlockConfigError(f"unknown FFN variant name {name!r} (expected ffn_N, ffn_linear, ffn_no_op)")


@dataclass(frozen=True)
class BlockConfig:
    attention: AttentionVariant
    ffn: FFNVariant

    @property
    def name(self) -> str:
        return f"{self.attention.name}+{self.ffn.name}"

    @classmethod
    def parent(cls, num_kv_heads: int, intermediate_size: int) -> "BlockConfig":
        return cls(AttentionVariant("full", num_kv_heads), FFNVariant("full", intermediate_size))


def variant_from_name(name: str) -> AttentionVariant | FFNVariant:
    return AttentionVariant.from_name(name) if name.startswith("attn_") else FFNVariant.from_name(name)


# --------------------------------------------------------------------------- JSON dialects

_ATTN_KEYS = {"no_op", "replace_with_linear", "n_heads_in_group", "num_query_groups"}
_FFN_KEYS = {"no_op", "replace_with_linear", "ffn_mult", "ffn_hidden_size", "intermediate_size"}
# Keys published Nemotron-NAS configs carry for features this project does not model
# (sliding windows, sink tokens, sparsity). Accepted only when unset (null/false).
_INERT_KEYS = {"sparsify", "window_length", "num_sink_tokens", "use_prefill_window_in_sink_attention",
               "unshifted_sink", "llama4", "weights_precision"}


def block_to_dict(block: BlockConfig, hidden_size: int, num_attention_heads: int) -> dict[str, Any]:
    """One entry of `block_configs`, readable by HF DeciLM code and by Megatron-Core."""
    a, f = block.attention, block.ffn
    attn: dict[str, Any] = {
        "no_op": a.kind == "no_op",
        "replace_with_linear": a.kind == "linear",
        "n_heads_in_group": num_attention_heads // a.num_kv_heads if a.kind == "full" else None,
        "num_query_groups": a.num_kv_heads,
    }
    ffn: dict[str, Any] = {"no_op": f.kind == "no_op", "replace_with_linear": f.kind == "linear"}
    if f.kind == "full":
        ffn["ffn_mult"], _ = intermediate_size_to_ffn_mult(f.intermediate_size, hidden_size)
        ffn["ffn_hidden_size"] = f.intermediate_size
    else:
        ffn["ffn_mult"] = None
        ffn["ffn_hidden_size"] = None
    return {"attention": attn, "ffn": ffn}


def blocks_to_json(blocks: Sequence[BlockConfig], hidden_size: int, num_attention_heads: int) -> list[dict]:
    return [block_to_dict(b, hidden_size, num_attention_heads) for b in blocks]


def _flag(d: dict, key: str, where: str) -> bool:
    v = d.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise BlockConfigError(f"{where}.{key} must be true or false, got {v!r}")
    return v


def _positive_int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v <= 0:
        raise BlockConfigError(f"{where} must be a positive integer, got {v!r}")
    return int(v)


def block_from_dict(
    entry: Any, layer: int, *, hidden_size: int, num_attention_heads: int, num_kv_heads: int, intermediate_size: int
) -> BlockConfig:
    """Parse one `block_configs` entry in either dialect; `null` sizes mean the parent's."""
    where = f"block_configs[{layer}]"
    if not isinstance(entry, dict):
        raise BlockConfigError(f"{where} must be an object with 'attention' and 'ffn', got {type(entry).__name__}")
    unknown = set(entry) - {"attention", "ffn", "mlp"}
    if unknown:
        raise BlockConfigError(f"{where} has unknown keys {sorted(unknown)} (allowed: attention, ffn)")
    if "attention" not in entry or not ("ffn" in entry or "mlp" in entry):
        raise BlockConfigError(f"{where} needs both 'attention' and 'ffn'")
    attn, ffn = entry["attention"], entry.get("ffn", entry.get("mlp"))
    for sub, d, keys in (("attention", attn, _ATTN_KEYS), ("ffn", ffn, _FFN_KEYS)):
        if not isinstance(d, dict):
            raise BlockConfigError(f"{where}.{sub} must be an object")
        bad = set(d) - keys - _INERT_KEYS
        if bad:
            raise BlockConfigError(f"{where}.{sub} has unknown keys {sorted(bad)} (allowed: {sorted(keys)})")
        used = sorted(k for k in set(d) & _INERT_KEYS if d[k] not in (None, False) and k != "weights_precision")
        if used:
            raise BlockConfigError(f"{where}.{sub} sets {used}, a feature this project does not support; "
                                   "only plain, GQA, linear and no-op subblocks can be imported")

    # attention
    w = f"{where}.attention"
    no_op, linear = _flag(attn, "no_op", w), _flag(attn, "replace_with_linear", w)
    if no_op and linear:
        raise BlockConfigError(f"{w}: no_op and replace_with_linear are both true; choose one")
    if no_op or linear:
        attention = AttentionVariant("no_op" if no_op else "linear")
    else:
        if attn.get("num_query_groups") is not None:
            kv = _positive_int(attn["num_query_groups"], f"{w}.num_query_groups")
        elif attn.get("n_heads_in_group") is not None:
            g = _positive_int(attn["n_heads_in_group"], f"{w}.n_heads_in_group")
            if num_attention_heads % g:
                raise BlockConfigError(
                    f"{w}.n_heads_in_group={g} does not divide the {num_attention_heads} query heads"
                )
            kv = num_attention_heads // g
        else:
            kv = num_kv_heads
        if num_attention_heads % kv:
            raise BlockConfigError(
                f"{w}: {kv} KV heads do not divide the {num_attention_heads} query heads; "
                f"use a divisor of {num_attention_heads}"
            )
        attention = AttentionVariant("full", kv)

    # ffn
    w = f"{where}.ffn"
    no_op, linear = _flag(ffn, "no_op", w), _flag(ffn, "replace_with_linear", w)
    if no_op and linear:
        raise BlockConfigError(f"{w}: no_op and replace_with_linear are both true; choose one")
    if no_op or linear:
        f = FFNVariant("no_op" if no_op else "linear")
    else:
        exact = ffn.get("ffn_hidden_size", ffn.get("intermediate_size"))
        if exact is not None:
            size = _positive_int(exact, f"{w}.ffn_hidden_size")
        elif ffn.get("ffn_mult") is not None:
            m = ffn["ffn_mult"]
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0:
                raise BlockConfigError(f"{w}.ffn_mult must be a positive number, got {m!r}")
            size = ffn_mult_to_intermediate_size(m, hidden_size)
        else:
            size = intermediate_size
        f = FFNVariant("full", size)
    return BlockConfig(attention, f)


def blocks_from_json(
    data: Any,
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
) -> list[BlockConfig]:
    """Parse a `block_configs` list, a config dict holding one, or JSON text of either."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise BlockConfigError(f"block configs are not valid JSON: {e}") from None
    if isinstance(data, dict):
        if "block_configs" not in data:
            raise BlockConfigError("expected a 'block_configs' list (or a config object holding one)")
        data = data["block_configs"]
    if not isinstance(data, list):
        raise BlockConfigError(f"block_configs must be a list, got {type(data).__name__}")
    if len(data) != num_layers:
        raise BlockConfigError(f"block_configs has {len(data)} entries but the model has {num_layers} layers")
    return [
        block_from_dict(
            e, i, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
            num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
        )
        for i, e in enumerate(data)
    ]


def describe(blocks: Iterable[BlockConfig]) -> str:
    """One line per layer, for logs and reports."""
    return "\n".join(f"layer {i:3d}: {b.attention.name:12s} {b.ffn.name}" for i, b in enumerate(blocks))
