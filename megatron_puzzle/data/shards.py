"""Tokenize a corpus into the train / calibration / held-out token shards of a run.

Documents are read in corpus order and tokenized with the parent's tokenizer, with
an EOS token after each document. The splits take contiguous document ranges, in the
order train, calib, heldout: each split fills its token budget exactly, and the
document that crosses a budget is cut there and its rest discarded, so no document
contributes to two splits. Held-out text therefore comes from a later part of the
corpus than training text. The corpus is read only as far as the budgets need.

Layout (`docs/formats.md`): one Megatron-Core indexed dataset per split
(`train.bin/.idx`, `calib.bin/.idx`, `heldout.bin/.idx`: what
`megatron.core.datasets.indexed_dataset.IndexedDataset("RUN/data/train")` reads, one
document per corpus document, or the part of it the split kept), `meta.json`, `done`.
Shards of format version 1 (`train.npy`, ..., uint32) are still read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from megatron_puzzle.data.indexed import blend_documents, describe_blend, indexed_blend
from megatron_puzzle.data.sources import describe_source, load_corpus
from megatron_puzzle.model import parallel
from megatron_puzzle.utils.io import DONE_MARKER, atomic_dir, atomic_write_json, is_done, read_json

log = logging.getLogger(__name__)

SPLITS = ("train", "calib", "heldout")
TOKEN_DTYPE = np.uint32  # the widest token type; the indexed datasets use Megatron's smallest that fits
META_FILE = "meta.json"
FORMAT_VERSION = 2  # 1: one .npy per split; 2: Megatron-Core indexed datasets
# Defaults sized for a CPU run on the World English Bible (~1.1M tokens with a 49k BPE).
DEFAULT_BUDGETS = {"train": 524_288, "calib": 32_768, "heldout": 65_536}
_OWN_FILES = {f"{name}{ext}" for name in SPLITS for ext in (".npy", ".bin", ".idx")} | {META_FILE, DONE_MARKER}


class CorpusTooSmallError(ValueError):
    """The corpus ran out before every split reached its token budget."""


@dataclass
class _Split:
    name: str
    budget: int
    builder: Any  # megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder, written as documents come
    filled: int = 0
    first_doc: int | None = None
    last_doc: int | None = None  # inclusive
    truncated_last: bool = False

    def add(self, tokens: np.ndarray) -> None:
        self.builder.add_document(torch.from_numpy(tokens.astype(np.int64)), [len(tokens)])
        self.filled += len(tokens)

    def summary(self) -> dict[str, Any]:
        docs = [0, 0] if self.first_doc is None else [self.first_doc, self.last_doc + 1]
        return {
            "file": self.name,  # the indexed dataset's path prefix, relative to the data directory
            "tokens": self.filled,
            "documents": docs,  # [start, end) in corpus order
            "truncated_last_document": self.truncated_last,
        }


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    # No BOS or other special tokens: documents are separated by EOS only.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenizer_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _check_budgets(budgets: dict[str, int]) -> None:
    for name, n in budgets.items():
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"{name}_tokens must be a non-negative integer, got {n!r}")
    if budgets["train"] == 0:
        raise ValueError("train_tokens must be positive")


def _resolve_eos(tokenizer, eos_id: int | None) -> int:
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token or pass eos_id")
    return int(eos)


def build_token_shards(
    out_dir: str | Path,
    tokenizer,
    source: str | Path = "web",
    train_tokens: int = DEFAULT_BUDGETS["train"],
    calib_tokens: int = DEFAULT_BUDGETS["calib"],
    heldout_tokens: int = DEFAULT_BUDGETS["heldout"],
    seed: int = 0,
    *,
    eos_id: int | None = None,
    tokenizer_label: str | None = None,
    overwrite: bool = False,
    docs_per_batch: int = 64,
) -> dict[str, Any]:
    """Write `train.npy`, `calib.npy`, `heldout.npy` and `meta.json` into `out_dir` (atomically, with `done`).

    `tokenizer` is a Hugging Face tokenizer (callable, with `eos_token_id`). The
    shards depend only on the corpus, the tokenizer and the budgets; `seed` is
    recorded in meta.json as the default seed of loaders over these shards.
    `tokenizer_label` (default: the tokenizer's `name_or_path`) names it in meta.json.
    If `out_dir` already holds finished shards built with the same settings, they are
    kept and their meta returned; different settings need `overwrite=True`.
    Returns the meta dict (on rank 0; the settings asked, on the others).

    With torch.distributed started, every rank must call this: the tokenizing is spread
    over the ranks and rank 0 writes the same shards as one process would.
    """
    out_dir = Path(out_dir)
    budgets = {"train": train_tokens, "calib": calib_tokens, "heldout": heldout_tokens}
    _check_budgets(budgets)
    eos = _resolve_eos(tokenizer, eos_id)
    vocab_size = len(tokenizer)
    if vocab_size > np.iinfo(TOKEN_DTYPE).max:
        raise ValueError(f"vocabulary of {vocab_size} tokens does not fit {np.dtype(TOKEN_DTYPE).name}")
    blend = indexed_blend(source)  # existing Megatron datasets: already tokens
    described = describe_blend(blend) if blend else describe_source(source)
    wanted = {"tokenizer": tokenizer_label or tokenizer_name(tokenizer), "vocab_size": vocab_size, "eos_id": eos,
              "source": described, "tokens": {k: int(v) for k, v in budgets.items()}}

    if is_done(out_dir) and not overwrite:
        meta = read_meta(out_dir)
        if all(meta.get(k) == v for k, v in wanted.items()):
            log.info("token shards in %s already built; keeping them", out_dir)
            return meta
        raise FileExistsError(
            f"{out_dir} holds token shards built with other settings "
            f"(tokenizer {meta.get('tokenizer')}, source {meta.get('source')}, tokens {meta.get('tokens')}); "
            "remove it or rebuild with overwrite"
        )

    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _OWN_FILES) if out_dir.is_dir() else []
    if foreign:
        raise FileExistsError(f"{out_dir} holds files that are not token shards ({', '.join(foreign[:5])}); "
                              "choose an empty or new output directory")
    documents = load_corpus(source) if blend is None else None  # raises for a missing path before any output
    rank, world = (parallel.rank(), parallel.world_size()) if dist.is_initialized() else (0, 1)
    if rank != 0:  # tokenize a share for rank 0, which alone writes (nothing to tokenize in a Megatron dataset)
        if blend is None:
            _encode_for_rank0(documents, tokenizer, docs_per_batch, rank, world)
        return wanted
    log.info("tokenizing %s into %s with %s on %d rank(s) (train %d, calib %d, heldout %d tokens)",
             described, out_dir, wanted["tokenizer"], world, train_tokens, calib_tokens, heldout_tokens)
    start = time.perf_counter()
    if blend is not None:
        encoded = _batched((("", doc) for doc in blend_documents(blend, vocab_size)), docs_per_batch)
    elif world == 1:
        encoded = _encoded(documents, tokenizer, docs_per_batch)
    else:
        encoded = _encoded_over_ranks(documents, tokenizer, docs_per_batch, rank, world)
    # Only our own files are there (a leftover of a killed run, or overwrite): replace them.
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(vocab_size)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        splits = [_Split(name, n, IndexedDatasetBuilder(str(tmp / f"{name}.bin"), dtype=dtype))
                  for name, n in budgets.items()]
        try:
            n_docs, n_chars = _fill(splits, encoded, None if blend else eos, described)
        finally:
            encoded.close()  # under several ranks: tells the others to stop
        for split in splits:
            split.builder.finalize(str(tmp / f"{split.name}.idx"))
        meta = {
            "format_version": FORMAT_VERSION,
            **wanted,
            "dtype": np.dtype(dtype).name,
            "seed": int(seed),
            "splits": {s.name: s.summary() for s in splits},
            "documents_read": n_docs,
            "characters_read": n_chars,
            "wall_s": round(time.perf_counter() - start, 3),
        }
        atomic_write_json(tmp / META_FILE, meta)
    log.info("wrote %s: %s tokens from %d documents in %.1f s", out_dir,
             ", ".join(f"{s.name} {s.filled}" for s in splits), n_docs, meta["wall_s"])
    return meta


def _encoded(documents: Iterable[str], tokenizer, docs_per_batch: int) -> Iterator[list[tuple[str, list[int]]]]:
    """(text, token ids) of every document, in corpus order, a batch at a time (one process)."""
    for texts in _batched(documents, docs_per_batch):
        yield list(zip(texts, _encode_batch(tokenizer, texts)))


def _encoded_over_ranks(documents: Iterable[str], tokenizer, docs_per_batch: int, rank: int,
                        world: int) -> Iterator[list[tuple[str, list[int]]]]:
    """As `_encoded`, with the tokenizing spread over the ranks: rank r encodes the r-th slice of each
    chunk of `world` batches, and rank 0 gathers them back in corpus order.

    Every rank reads the corpus (cheap next to tokenizing). Rank 0 consumes what this yields; the other
    ranks run `_encode_for_rank0` alongside. Before each chunk rank 0 broadcasts whether it wants more,
    so when the splits are full (or the corpus ends) every rank stops at the same chunk.
    """
    chunks = _batched(documents, docs_per_batch * world)
    try:
        while True:
            dist.broadcast_object_list([True], src=0)
            texts = next(chunks, [])
            mine = texts[rank * docs_per_batch:(rank + 1) * docs_per_batch]
            parts: list = [None] * world
            dist.gather_object(_encode_batch(tokenizer, mine) if mine else [], parts, dst=0)
            if not texts:
                return
            yield list(zip(texts, (ids for part in parts for ids in part)))
    finally:  # the splits are full, the corpus ended, or rank 0 failed: the other ranks stop too
        dist.broadcast_object_list([False], src=0)


def _encode_for_rank0(documents: Iterable[str], tokenizer, docs_per_batch: int, rank: int, world: int) -> None:
    """The other ranks' side of `_encoded_over_ranks`."""
    chunks = _batched(documents, docs_per_batch * world)
    while True:
        more = [None]
        dist.broadcast_object_list(more, src=0)
        if not more[0]:
            return
        texts = next(chunks, [])
        mine = texts[rank * docs_per_batch:(rank + 1) * docs_per_batch]
        dist.gather_object(_encode_batch(tokenizer, mine) if mine else [], None, dst=0)


def _fill(splits: list[_Split], encoded: Iterable[list[tuple[str, list[int]]]], eos: int | None,
          source: str) -> tuple[int, int]:
    """Copy document tokens into the splits in order, each followed by `eos` (None: documents already
    end as they should); return (documents read, characters read)."""
    pending = [s for s in splits if s.budget > 0]
    total = sum(s.budget for s in splits)
    n_docs = n_chars = 0
    with tqdm(total=total, unit="tok", desc="tokenize", disable=None) as bar:
        for batch in encoded:
            for text, ids in batch:
                if not pending:
                    return n_docs, n_chars
                doc_index = n_docs
                n_docs += 1
                n_chars += len(text)
                split = pending[0]
                tokens = np.asarray(ids if eos is None else [*ids, eos], dtype=TOKEN_DTYPE)
                take = min(len(tokens), split.budget - split.filled)
                split.add(tokens[:take])
                if split.first_doc is None:
                    split.first_doc = doc_index
                split.last_doc = doc_index
                bar.update(take)
                if split.filled == split.budget:
                    split.truncated_last = take < len(tokens)
                    pending.pop(0)
            if not pending:
                return n_docs, n_chars
    if pending:
        got = sum(s.filled for s in splits)
        raise CorpusTooSmallError(
            f"the corpus {source} ran out after {n_docs} documents: {got} of the {total} tokens asked "
            f"({', '.join(f'{s.name} {s.budget}' for s in splits)}) were filled; "
            "lower --train-tokens/--calib-tokens/--heldout-tokens or use a larger corpus"
        )
    return n_docs, n_chars


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of finished shards; a clear error if the data stage has not finished."""
    data_dir = Path(data_dir)
    if not is_done(data_dir):
        raise FileNotFoundError(f"no finished token shards in {data_dir}; run `megatron-puzzle data` first")
    return read_json(data_dir / META_FILE)


def load_split(data_dir: str | Path, split: str) -> np.ndarray:
    """The tokens of one split as one flat array, memory-mapped read-only (documents back to back)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    meta = read_meta(data_dir)
    path = Path(data_dir) / meta["splits"][split]["file"]
    if path.suffix == ".npy":  # format version 1
        return np.load(path, mmap_mode="r")
    return read_indexed_tokens(path)


def read_indexed_tokens(prefix: str | Path) -> np.ndarray:
    """Every token of the Megatron-Core indexed dataset at `prefix` (PREFIX.bin/.idx), memory-mapped.

    The .bin file is the documents' tokens back to back in the index's dtype (what
    IndexedDataset reads document by document), so it maps as one array.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(prefix)
    if not (Path(prefix + ".bin").exists() and Path(prefix + ".idx").exists()):
        raise FileNotFoundError(f"no Megatron indexed dataset at {prefix} ({prefix}.bin and {prefix}.idx)")
    index = IndexedDataset(prefix).index
    tokens = np.memmap(prefix + ".bin", dtype=index.dtype, mode="r")
    if len(tokens) != int(index.sequence_lengths.sum()):
        raise ValueError(f"{prefix}.bin holds {len(tokens)} tokens but {prefix}.idx indexes "
                         f"{int(index.sequence_lengths.sum())}; the dataset is damaged, rebuild it")
    return tokens
