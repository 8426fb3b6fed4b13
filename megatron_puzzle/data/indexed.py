"""Existing Megatron-Core indexed datasets (and blends of them) as the data stage's input.

A user who already has tokenized data (`tools/preprocess_data.py` of Megatron-LM writes
PREFIX.bin/.idx) gives it as the source instead of text:

- a path prefix: `/data/web_text_document` (PREFIX.bin and PREFIX.idx exist), or
  `megatron:/data/web_text_document`;
- a blend, in Megatron's `--data-path` syntax after `megatron:`:
  `megatron:0.7 /data/web_text_document 0.3 /data/code_text_document`.

Documents are taken as stored (their own EOS included, nothing appended), in order; a
blend interleaves its datasets so that each has taken, at every point, about its weight's
share of the documents (the smallest (taken + 1) / weight goes next).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

PREFIX_TAG = "megatron:"


def is_indexed_prefix(path: str | Path) -> bool:
    p = str(path)
    return Path(p + ".bin").is_file() and Path(p + ".idx").is_file()


def indexed_blend(source: str | Path) -> list[tuple[float, str]] | None:
    """[(weight, prefix), ...] if `source` names Megatron indexed datasets, else None (a text source)."""
    text = str(source)
    if not text.startswith(PREFIX_TAG):
        return [(1.0, str(Path(text).resolve()))] if is_indexed_prefix(text) else None
    parts = text[len(PREFIX_TAG):].split()
    if len(parts) == 1:
        pairs = [(1.0, parts[0])]
    else:
        if len(parts) % 2:
            raise ValueError(f"blend {text!r}: give weight-prefix pairs, e.g. 'megatron:0.7 /data/a 0.3 /data/b'")
        try:
            pairs = [(float(parts[i]), parts[i + 1]) for i in range(0, len(parts), 2)]
        except ValueError:
            raise ValueError(f"blend {text!r}: weights must be numbers, e.g. 'megatron:0.7 /data/a 0.3 /data/b'") from None
    for w, prefix in pairs:
        if not w > 0:
            raise ValueError(f"blend {text!r}: weight {w} of {prefix} must be positive")
        if not is_indexed_prefix(prefix):
            raise FileNotFoundError(f"no Megatron indexed dataset at {prefix} ({prefix}.bin and {prefix}.idx); "
                                    "give the path prefix the preprocessing wrote")
    return [(w, str(Path(p).resolve())) for w, p in pairs]


def describe_blend(blend: list[tuple[float, str]]) -> str:
    return PREFIX_TAG + " ".join(f"{w:g} {p}" for w, p in blend)


def blend_documents(blend: list[tuple[float, str]], vocab_size: int) -> Iterator[np.ndarray]:
    """The documents of `blend`, interleaved by weight, each checked against the tokenizer's vocabulary."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    datasets = [IndexedDataset(p) for _, p in blend]
    # a document is all sequences between two document indices
    bounds = [ds.document_indices for ds in datasets]
    taken = [0] * len(datasets)
    live = [i for i, ds in enumerate(datasets) if len(bounds[i]) > 1]
    while live:
        i = min(live, key=lambda k: ((taken[k] + 1) / blend[k][0], k))
        d = taken[i]
        first, last = int(bounds[i][d]), int(bounds[i][d + 1])
        doc = np.concatenate([datasets[i][s] for s in range(first, last)]) if last > first else np.zeros(0, np.int64)
        if doc.size and int(doc.max()) >= vocab_size:
            raise ValueError(f"{blend[i][1]} holds token id {int(doc.max())} but the parent's tokenizer has "
                             f"{vocab_size} tokens: the dataset was tokenized with another tokenizer")
        taken[i] += 1
        if taken[i] == len(bounds[i]) - 1:
            live.remove(i)
        yield doc
