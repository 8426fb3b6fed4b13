"""Tests of the data stage: zText reader, corpus sources, token shards, batch loader, CLI."""

from __future__ import annotations

import argparse
import json
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_puzzle.data import (
    CorpusTooSmallError,
    TokenBatches,
    build_token_shards,
    default_sample_path,
    load_corpus,
    load_split,
    read_meta,
)
from megatron_puzzle.data import cli as data_cli
from megatron_puzzle.data import sources
from megatron_puzzle.data.ztext import ZTextError, iter_entries
from megatron_puzzle.utils.io import is_done

# ---------------------------------------------------------------- helpers


def write_ztext(module_dir: Path, testament: str, books: list[list[str]], links: dict[int, int] | None = None) -> None:
    """Write one testament of a zText module: one zlib block per book, one index entry per fragment.

    `links` maps an entry number to an earlier one whose bytes it reuses (a linked verse).
    """
    module_dir.mkdir(parents=True, exist_ok=True)
    bzs, bzz, bzv = bytearray(), bytearray(), bytearray()
    bzv += struct.pack("<IIH", 0, 0, 0)  # module heading: empty
    entries = []
    for block, fragments in enumerate(books):
        raw = bytearray()
        for fragment in fragments:
            data = fragment.encode("utf-8")
            entries.append((block, len(raw), len(data)))
            raw += data
        packed = zlib.compress(bytes(raw))
        bzs += struct.pack("<III", len(bzz), len(packed), len(raw))
        bzz += packed
    for i in range(len(entries)):
        block, offset, size = entries[(links or {}).get(i, i)]
        bzv += struct.pack("<IIH", block, offset, size & 0xFFFF)  # sizes are 16-bit on disk
    (module_dir / f"{testament}.bzs").write_bytes(bytes(bzs))
    (module_dir / f"{testament}.bzz").write_bytes(bytes(bzz))
    (module_dir / f"{testament}.bzv").write_bytes(bytes(bzv))


def word(w: str, n: int = 1) -> str:
    return f'<w lemma="strong:H{n:04d}">{w}</w>'


def make_tokenizer(texts, eos="<eos>"):
    """A whitespace word-level HF tokenizer trained on `texts` (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=["<unk>", eos]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=eos)


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    """Documents of varying length, each opening with its own marker word `docN`."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return [f"doc{i} " + " ".join(rng.choice(words, size=int(rng.integers(5, 40)))) for i in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


# ---------------------------------------------------------------- zText reader

SYNTH_OT = [
    [
        '<milestone type="x-importer" n="test"/>',
        '<div type="front" sID="f1"/><title type="main">A Preface</title> Read this first.<div type="front" eID="f1"/>'
        '<div canonical="true" osisID="Gen" sID="b1" type="book"/> <title type="main">Book One</title>',
        '<chapter n="1" osisID="Gen.1" sID="Gen.1"/>',
        word("In") + " " + word("the") + " " + word("beginning") + ", " + word("God")
        + '<note placement="foot"><reference type="annotateRef">1:1 </reference>A “footnote”.</note>'
        + word("created") + " &amp; " + word("rested") + ".",
        '<div sID="p1" type="x-p"/><l level="1" sID="l1"/>Line one<l level="1" eID="l1"/><l level="1" sID="l2"/>line two.',
        '<chapter n="1" osisID="Gen.1" eID="Gen.1"/><chapter n="2" osisID="Gen.2" sID="Gen.2"/>',
        "Second  chapter\n text.",
    ],
    [
        '<div canonical="true" osisID="Exod" sID="b2" type="book"/><title>Book Two</title>',
        '<chapter n="1" osisID="Exod.1" sID="Exod.1"/>',
        "Linked verse.",
        "(linked copy)",
    ],
]
SYNTH_NT = [
    ['<div canonical="true" osisID="Matt" sID="b3" type="book"/>', '<chapter n="1" osisID="Matt.1" sID="Matt.1"/>', "Last words."],
]
SYNTH_EXPECTED = [
    "A Preface Read this first.",
    "Book One In the beginning, God created & rested. Line one line two.",
    "Second chapter text.",
    "Book Two Linked verse.",
    "Last words.",
]


@pytest.fixture
def synthetic_module(tmp_path) -> Path:
    module = tmp_path / "engTEST"
    # Entry 10 (second-to-last-but-one of the OT) re-points at entry 9: read once.
    write_ztext(module, "ot", SYNTH_OT, links={10: 9})
    write_ztext(module, "nt", SYNTH_NT)
    return module


def test_ztext_reader_extracts_chapters_in_order(synthetic_module):
    docs = list(load_corpus(synthetic_module))
    assert docs == SYNTH_EXPECTED


def test_ztext_reader_raw_entries_roundtrip(synthetic_module):
    # Every non-empty fragment comes back byte-exact, linked duplicates once.
    expected = [f for book in SYNTH_OT for f in book][:-1] + [f for book in SYNTH_NT for f in book]
    assert list(iter_entries(synthetic_module)) == expected


def test_ztext_reader_restores_wrapped_sizes(tmp_path):
    long_text = " ".join(f"w{i}" for i in range(14_000))  # > 65536 bytes in one entry
    module = tmp_path / "long"
    write_ztext(module, "ot", [['<chapter osisID="A.1" sID="A.1"/>', long_text, "after."], [long_text]])
    assert list(iter_entries(module)) == ['<chapter osisID="A.1" sID="A.1"/>', long_text, "after.", long_text]


def test_ztext_reader_rejects_corrupt_module(tmp_path, synthetic_module):
    (synthetic_module / "ot.bzs").write_bytes(b"\x00" * 13)
    with pytest.raises(ZTextError, match="not a multiple"):
        list(iter_entries(synthetic_module))
    bad = tmp_path / "bad"
    write_ztext(bad, "ot", [["text"]])
    (bad / "ot.bzz").write_bytes(b"not zlib data at all")
    with pytest.raises(ZTextError, match="zlib"):
        list(iter_entries(bad))


web_installed = pytest.mark.skipif(sources.web_module_dir() is None, reason="sword-text-web not installed")


@web_installed
def test_installed_web_bible():
    docs = list(load_corpus("web"))
    text = "\n".join(docs)
    assert len(text.encode("utf-8")) > 4_000_000
    assert "In the beginning, God created the heavens and the earth." in docs[1]
    assert "<" not in text and ">" not in text  # no markup left
    # canonical order: Genesis, Exodus, ..., Matthew, ..., Revelation
    first = [text.index(s) for s in ("Commonly Called Genesis", "Commonly Called Exodus", "According to Matthew", "The Revelation to John")]
    assert first == sorted(first)


@web_installed
def test_shipped_sample_is_reader_output():
    from megatron_puzzle.data.make_sample import render, sample_documents

    assert render(sample_documents(sources.web_module_dir())) == default_sample_path().read_text(encoding="utf-8")


# ---------------------------------------------------------------- corpus sources


def test_shipped_sample():
    size = default_sample_path().stat().st_size
    assert 100_000 <= size <= 200_000
    docs = list(load_corpus("sample"))
    assert len(docs) > 20 and all(docs)
    assert (default_sample_path().parent / "README.txt").read_text().count("public domain") == 1


def test_web_falls_back_to_sample_with_warning(monkeypatch, caplog):
    monkeypatch.setattr(sources, "web_module_dir", lambda: None)
    with caplog.at_level(logging.WARNING, logger=sources.__name__):
        docs = list(load_corpus("web"))
    assert docs == list(load_corpus("sample"))
    assert "apt-get install -y sword-text-web" in caplog.text


def test_plain_text_jsonl_and_directory_sources(tmp_path):
    docs = ["First  document,\nsecond line.", "Second document.", "Third\tone."]
    expected = ["First document,\nsecond line.", "Second document.", "Third one."]
    txt = tmp_path / "corpus" / "a.txt"
    txt.parent.mkdir()
    txt.write_text("\n\n\n".join(docs[:2]) + "\n  \n" + docs[2] + "\n")
    assert list(load_corpus(txt)) == expected
    jsonl = write_jsonl(tmp_path / "corpus" / "b.jsonl", ["json one", "json two"])
    assert list(load_corpus(jsonl)) == ["json one", "json two"]
    assert list(load_corpus(txt.parent)) == expected + ["json one", "json two"]  # sorted file order


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*\"text\""):
        list(load_corpus(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt or .jsonl"):
        list(load_corpus(tmp_path / "empty"))


@pytest.mark.skipif(not sources.FORTUNES_DIR.is_dir(), reason="fortunes not installed")
def test_fortunes_source():
    docs = list(load_corpus("fortunes"))
    assert len(docs) > 1000
    assert not any(d.strip() == "%" or "\x08" in d for d in docs)


# ---------------------------------------------------------------- token shards


def reference_splits(tokenizer, docs, budgets):
    """Brute force: token lists per split, each split starting at a fresh document."""
    eos = tokenizer.eos_token_id
    streams = [tokenizer.encode(d, add_special_tokens=False) + [eos] for d in docs]
    out, doc = {}, 0
    for name, budget in budgets.items():
        tokens, used = [], []
        while len(tokens) < budget:
            tokens += streams[doc]
            used.append(doc)
            doc += 1
        out[name] = (tokens[:budget], used)
    return out


def test_build_token_shards_matches_reference(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = synthetic_docs(300)
    corpus = write_jsonl(tmp_path / "docs.jsonl", docs)
    tok = make_tokenizer(docs)
    budgets = {"train": 2000, "calib": 300, "heldout": 500}
    meta = build_token_shards(tmp_path / "run" / "data", tok, source=corpus, seed=7,
                              train_tokens=2000, calib_tokens=300, heldout_tokens=500)
    data = tmp_path / "run" / "data"
    assert is_done(data)
    assert meta == read_meta(data)
    assert meta["vocab_size"] == len(tok) and meta["seed"] == 7 and meta["eos_id"] == tok.eos_token_id
    assert meta["tokens"] == budgets
    ref = reference_splits(tok, docs, budgets)
    seen_docs = []
    for name, budget in budgets.items():
        arr = load_split(data, name)
        assert arr.dtype == np.uint16 == np.dtype(meta["dtype"]) and arr.shape == (budget,)  # Megatron's for a small vocab
        assert arr.tolist() == ref[name][0]
        start, end = meta["splits"][name]["documents"]
        # Megatron-Core reads the split as an indexed dataset: one document per corpus document kept
        mds = IndexedDataset(str(data / name))
        assert len(mds) == end - start and np.concatenate([mds[i] for i in range(len(mds))]).tolist() == ref[name][0]
        assert list(range(start, end)) == ref[name][1]
        # the documents a split holds, read back from the text itself
        markers = {w for w in tok.decode(arr.tolist()).split() if w.startswith("doc")}
        assert markers <= {f"doc{i}" for i in range(start, end)}
        seen_docs.append(set(range(start, end)))
    assert not (seen_docs[0] & seen_docs[1]) and not (seen_docs[1] & seen_docs[2]) and not (seen_docs[0] & seen_docs[2])
    assert max(seen_docs[0]) < min(seen_docs[2])  # held-out text comes after the training text


def test_shards_resume_and_settings_guard(tmp_path):
    docs = synthetic_docs(100)
    corpus = write_jsonl(tmp_path / "docs.jsonl", docs)
    tok = make_tokenizer(docs)
    out = tmp_path / "data"
    kw = dict(train_tokens=500, calib_tokens=100, heldout_tokens=100)
    first = build_token_shards(out, tok, source=corpus, **kw)
    assert build_token_shards(out, tok, source=corpus, **kw) == first  # finished: kept as is
    with pytest.raises(FileExistsError, match="other settings"):
        build_token_shards(out, tok, source=corpus, train_tokens=400, calib_tokens=100, heldout_tokens=100)
    meta = build_token_shards(out, tok, source=corpus, train_tokens=400, calib_tokens=100, heldout_tokens=100, overwrite=True)
    assert load_split(out, "train").shape == (400,) and meta["tokens"]["train"] == 400


def test_shard_errors(tmp_path):
    docs = synthetic_docs(20)
    corpus = write_jsonl(tmp_path / "docs.jsonl", docs)
    tok = make_tokenizer(docs)
    out = tmp_path / "data"
    with pytest.raises(CorpusTooSmallError, match="docs.jsonl ran out after 20 documents.*lower --train-tokens"):
        build_token_shards(out, tok, source=corpus, train_tokens=10_000, calib_tokens=10, heldout_tokens=10)
    assert not out.exists()  # nothing half-written left behind
    with pytest.raises(FileNotFoundError, match="nowhere.txt does not exist"):
        build_token_shards(out, tok, source=tmp_path / "nowhere.txt", train_tokens=10)
    with pytest.raises(ValueError, match="calib_tokens must be a non-negative"):
        build_token_shards(out, tok, source=corpus, train_tokens=10, calib_tokens=-1)
    with pytest.raises(FileNotFoundError, match="megatron-puzzle data"):
        read_meta(tmp_path)
    with pytest.raises(FileExistsError, match="not token shards.*docs.jsonl"):  # never clobber other files
        build_token_shards(tmp_path, tok, source=corpus, train_tokens=10)
    assert corpus.exists()


# ---------------------------------------------------------------- loader


@pytest.fixture
def shard(tmp_path) -> Path:
    path = tmp_path / "train.npy"
    np.save(path, np.arange(1000, dtype=np.uint32))  # token value == position: windows are easy to check
    return path


def test_loader_sequential_windows(shard):
    tokens = np.arange(1000)
    plain = list(TokenBatches(shard, seq_len=10, batch_size=4, shuffle=False))
    assert len(plain) == 25 and plain[0].dtype == torch.long and plain[0].shape == (4, 10)
    assert torch.equal(torch.cat(plain), torch.from_numpy(tokens.reshape(100, 10)))
    lm = list(TokenBatches(shard, seq_len=10, batch_size=4, shuffle=False, targets=True))
    assert lm[0].shape == (4, 11)
    rows = torch.cat(lm)
    assert len(rows) == 96  # (1000 - 11) // 10 + 1 = 99 windows, 24 full batches of 4
    assert torch.equal(rows[:, :-1], torch.from_numpy(tokens[: 96 * 10].reshape(96, 10)))
    assert torch.equal(rows[:-1, -1], rows[1:, 0])  # each window's last label is the next window's first input


def test_loader_deterministic_per_seed(shard):
    a = list(TokenBatches(shard, 8, 4, seed=3))
    b = list(TokenBatches(shard, 8, 4, seed=3))
    c = list(TokenBatches(shard, 8, 4, seed=4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # a shuffled epoch draws distinct whole windows (125 windows: 31 batches of 4, one left out)
    starts = torch.cat(a)[:, 0].tolist()
    assert len(a) == 31 and len(set(starts)) == 124 and all(s % 8 == 0 for s in starts)
    assert torch.equal(torch.cat(a)[:, 1:] - torch.cat(a)[:, :-1], torch.ones(124, 7, dtype=torch.long))


def test_loader_ranks_are_disjoint(shard):
    world = 3
    per_rank = [list(TokenBatches(shard, 8, 4, seed=1, rank=r, world_size=world)) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1
    starts = [torch.cat(p)[:, 0].tolist() for p in per_rank]
    all_starts = [s for rank in starts for s in rank]
    assert len(all_starts) == len(set(all_starts))  # no window seen by two ranks (or twice) in an epoch
    single = torch.cat(list(TokenBatches(shard, 8, 4 * world, seed=1)))
    assert sorted(all_starts) == sorted(single[:, 0].tolist())  # ranks split exactly the global batches


def test_loader_resume_from_batch_index(shard):
    full = list(TokenBatches(shard, 8, 4, seed=2, epochs=3))
    per_epoch = len(full) // 3
    for k in (0, 5, per_epoch, per_epoch + 7):
        resumed = list(TokenBatches(shard, 8, 4, seed=2, epochs=3, start_batch=k))
        assert len(resumed) == len(full) - k
        assert all(torch.equal(x, y) for x, y in zip(resumed, full[k:]))
    loader = TokenBatches(shard, 8, 4, seed=2)
    assert torch.equal(loader.batch(per_epoch + 1), full[per_epoch + 1])  # random access, epoch 2
    assert not torch.equal(full[0], full[per_epoch])  # each epoch reshuffles
    endless = iter(TokenBatches(shard, 8, 4, seed=2, epochs=None))
    assert all(torch.equal(next(endless), x) for x in full)


def test_loader_from_data_dir_and_errors(tmp_path, shard):
    docs = synthetic_docs(100)
    tok = make_tokenizer(docs)
    data = tmp_path / "data"
    build_token_shards(data, tok, source=write_jsonl(tmp_path / "d.jsonl", docs), seed=5,
                       train_tokens=400, calib_tokens=50, heldout_tokens=100)
    loader = TokenBatches(data, 16, 2, split="heldout")
    assert loader.seed == 5 and loader.num_windows == 100 // 16
    first = next(iter(loader))[0]
    assert first.tolist() in [load_split(data, "heldout")[i * 16 : i * 16 + 16].tolist() for i in range(6)]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TokenBatches(shard, 100, 4, world_size=3)
    with pytest.raises(ValueError, match="rank 3 is not in"):
        TokenBatches(shard, 8, 4, rank=3, world_size=3)
    with pytest.raises(FileNotFoundError, match="megatron-puzzle data"):
        TokenBatches(tmp_path / "nope.npy", 8, 4)


# ---------------------------------------------------------------- CLI


def test_cli_builds_shards_from_sample(tmp_path):
    tok = make_tokenizer(load_corpus("sample"))
    tok.save_pretrained(tmp_path / "tok")
    parser = argparse.ArgumentParser()
    data_cli.register(parser.add_subparsers())
    args = parser.parse_args(["data", "--run-dir", str(tmp_path / "run"), "--tokenizer", str(tmp_path / "tok"),
                              "--source", "sample", "--train-tokens", "5000", "--calib-tokens", "1000",
                              "--heldout-tokens", "2000"])
    assert args.func(args) == 0
    meta = read_meta(tmp_path / "run" / "data")
    assert meta["tokens"] == {"train": 5000, "calib": 1000, "heldout": 2000}
    assert meta["source"].startswith("sample:") and meta["vocab_size"] == len(tok)
    from megatron_puzzle.cli import UserError

    args = parser.parse_args(["data", "--run-dir", str(tmp_path / "run2"), "--tokenizer", str(tmp_path / "tok"),
                              "--source", str(tmp_path / "missing")])
    with pytest.raises(UserError, match="does not exist"):
        args.func(args)


def test_data_stage_on_two_ranks_writes_what_one_writes(tmp_path):
    """`megatron-puzzle data` under torchrun on 2 ranks (tokenizing spread over them) writes the same
    Megatron indexed datasets, byte for byte, as one process; megatron.core.datasets reads them back."""
    import subprocess
    import sys

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_puzzle.model.parallel import free_port

    docs = synthetic_docs(600)
    corpus = write_jsonl(tmp_path / "docs.jsonl", docs)
    make_tokenizer(docs).save_pretrained(tmp_path / "tok")
    args = ["data", "--tokenizer", str(tmp_path / "tok"), "--source", str(corpus), "--train-tokens", "6000",
            "--calib-tokens", "1000", "--heldout-tokens", "2000"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    one = subprocess.run([sys.executable, "-m", "megatron_puzzle", *args, "--run-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                          f"--master-port={free_port()}", "-m", "megatron_puzzle", *args,
                          "--run-dir", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 rank(s)" in two.stderr and two.stdout.count("token shards in") == 2
    a, b = tmp_path / "one" / "data", tmp_path / "two" / "data"
    ma, mb = read_meta(a), read_meta(b)
    ma.pop("wall_s"), mb.pop("wall_s")
    assert ma == mb and ma["documents_read"] > 4 * 64 * 2 // 2  # several chunks of 2 x 64 documents
    ref = reference_splits(make_tokenizer(docs), docs, {"train": 6000, "calib": 1000, "heldout": 2000})
    for name in ("train", "calib", "heldout"):
        for ext in (".bin", ".idx"):
            assert (a / f"{name}{ext}").read_bytes() == (b / f"{name}{ext}").read_bytes()
        mds = IndexedDataset(str(b / name))
        assert np.concatenate([mds[i] for i in range(len(mds))]).tolist() == ref[name][0]
    assert not [p for p in (tmp_path / "two").rglob(".*")]  # no temporaries left


def _write_indexed(prefix: Path, docs: list[list[int]]) -> Path:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for d in docs:
        b.add_document(torch.tensor(d), [len(d)])
    b.finalize(str(prefix) + ".idx")
    return prefix


def test_existing_megatron_datasets_and_blends_as_input(tmp_path):
    """Pre-tokenized Megatron datasets are taken as stored (no EOS added), a blend interleaved by weight."""
    tok = make_tokenizer(synthetic_docs(20))
    v = len(tok)
    a = [[1 + i % (v - 1)] * 5 for i in range(40)]  # document i of A: five tokens (i % (v-1)) + 1
    b = [[2, 3, 4] for _ in range(40)]
    pa, pb = _write_indexed(tmp_path / "a_text", a), _write_indexed(tmp_path / "b_text", b)

    meta = build_token_shards(tmp_path / "one", tok, source=pa, train_tokens=50, calib_tokens=10, heldout_tokens=20)
    flat = [t for d in a for t in d]
    assert load_split(tmp_path / "one", "train").tolist() == flat[:50]
    assert load_split(tmp_path / "one", "heldout").tolist() == flat[60:80]
    assert meta["source"] == f"megatron:1 {pa}" and meta["splits"]["calib"]["documents"] == [10, 12]

    # equal weights alternate A, B; 2:1 takes A, A, B, ...
    build_token_shards(tmp_path / "eq", tok, source=f"megatron:1 {pa} 1 {pb}", train_tokens=16, calib_tokens=0,
                       heldout_tokens=0)
    assert load_split(tmp_path / "eq", "train").tolist() == a[0] + b[0] + a[1] + b[1]
    build_token_shards(tmp_path / "w", tok, source=f"megatron:2 {pa} 1 {pb}", train_tokens=26, calib_tokens=0,
                       heldout_tokens=0)
    assert load_split(tmp_path / "w", "train").tolist() == a[0] + a[1] + b[0] + a[2] + a[3] + b[1]

    with pytest.raises(FileNotFoundError, match="no Megatron indexed dataset"):
        build_token_shards(tmp_path / "x", tok, source=f"megatron:1 {pa} 1 {tmp_path / 'nope'}", train_tokens=8)
    with pytest.raises(ValueError, match="weight-prefix pairs"):
        build_token_shards(tmp_path / "x", tok, source=f"megatron:1 {pa} 1", train_tokens=8)
    big = _write_indexed(tmp_path / "big", [[v + 3, 1]])
    with pytest.raises(ValueError, match="tokenized with another tokenizer"):
        build_token_shards(tmp_path / "x", tok, source=big, train_tokens=2)
    assert not (tmp_path / "x").exists()
