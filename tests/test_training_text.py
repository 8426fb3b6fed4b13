"""benchmarks/training_text.py: the mixed train split holds what it says, and nucleus sampling narrows
to the greedy continuation."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from _models import REPO, tiny_parent


def _module():
    spec = importlib.util.spec_from_file_location("training_text", REPO / "benchmarks" / "training_text.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _data_dir(run, vocab=256):
    from megatron_puzzle.utils.io import atomic_write_json

    data = run / "data"
    data.mkdir(parents=True)
    g = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 5000), ("calib", 300), ("heldout", 700)):
        np.save(data / f"{split}.npy", g.integers(0, vocab // 2, n, dtype=np.uint32))
        splits[split] = {"file": f"{split}.npy", "tokens": n}
    atomic_write_json(data / "meta.json", {"seed": 0, "vocab_size": vocab, "splits": splits})
    (data / "done").write_text("ok\n")


@pytest.mark.parametrize("share, row_len", [(0.0, 30), (0.25, 30), (0.5, 30), (1.0, 30), (0.25, 300)])
def test_mixed_train_split(tmp_path, share, row_len):
    """row_len 300: 3000 samples at share 0.25 would need 9000 of the run's 5000 tokens, so fewer samples go in."""
    from megatron_puzzle.data.shards import load_split

    mod = _module()
    _data_dir(tmp_path)
    own = np.asarray(load_split(tmp_path / "data", "train")).astype(np.int64)
    rows = 128 + np.arange(10 * row_len).reshape(10, row_len) % 128  # "parent text": ids >= 128, unlike the run's
    n = mod.mixed_data(tmp_path, tmp_path / "mix", rows, share, block=64)
    train = np.asarray(load_split(tmp_path / "mix", "train")).astype(np.int64)
    assert len(train) == n
    theirs = train[train >= 128]
    expected_theirs = {0.0: 0, 1.0: rows.size}.get(share) if share in (0, 1) else \
        min(rows.size, round(own.size * share / (1 - share)))
    assert len(theirs) == expected_theirs
    np.testing.assert_array_equal(theirs, rows.reshape(-1)[:expected_theirs])  # in order, every token once
    ours = train[train < 128]
    if share == 0:
        np.testing.assert_array_equal(ours, own)
    else:
        assert abs(len(theirs) - share * len(train)) <= 1 and np.array_equal(ours, own[: len(ours)])
    if 0 < share < 1:  # interleaved: both sources in the first two blocks
        assert train[:64].max() < 128 and train[64:128].min() >= 128
    # the other splits are the run's own
    for split in ("calib", "heldout"):
        np.testing.assert_array_equal(load_split(tmp_path / "mix", split), load_split(tmp_path / "data", split))
    assert mod.mixed_data(tmp_path, tmp_path / "mix", rows[:1], share, block=64) == n  # finished: kept


def test_sampling_narrows_to_greedy_and_is_seeded(mcore):
    from megatron_puzzle.arch.shapes import random_canonical
    from megatron_puzzle.convert.megatron_layout import load_canonical
    from megatron_puzzle.model.gpt import build_model
    from megatron_puzzle.report.generations import greedy
    from megatron_puzzle.report.make import canonical_of
    from megatron_puzzle.cost.decilm_runtime import runtime_model

    mod = _module()
    cfg = tiny_parent(num_layers=2)
    parent = build_model(cfg)
    load_canonical(parent, random_canonical(cfg, seed=0, std=0.3))
    parent.eval()
    # top_p so small that the nucleus is the single likeliest token: sampling is greedy decoding
    rows = mod.sample_parent(parent, tokens=24, length=12, batch=2, temperature=1.0, top_p=1e-6, seed=0, start=3,
                             dtype=torch.float32)
    assert rows.shape == (2, 13) and (rows[:, 0] == 3).all()
    ref = greedy(runtime_model(*canonical_of(parent)), [3], 12)  # the report's greedy decoder
    np.testing.assert_array_equal(rows[0, 1:], ref)
    np.testing.assert_array_equal(rows[1], rows[0])
    a = mod.sample_parent(parent, tokens=48, length=12, batch=4, temperature=1.0, top_p=0.95, seed=5, start=3)
    b = mod.sample_parent(parent, tokens=48, length=12, batch=4, temperature=1.0, top_p=0.95, seed=5, start=3)
    c = mod.sample_parent(parent, tokens=48, length=12, batch=4, temperature=1.0, top_p=0.95, seed=6, start=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and len({tuple(r) for r in a}) > 1
    assert torch.from_numpy(a).max() < cfg.vocab_size
    # temperature 0 is greedy decoding, from any prefix
    prefixes = np.array([[3, 7, 1], [5, 2, 9]])
    rows = mod.sample_rows(parent, prefixes, 10, batch=2, temperature=0, top_p=0.95, seed=0, dtype=torch.float32)
    assert rows.shape == (2, 13)
    np.testing.assert_array_equal(rows[:, :3], prefixes)
    for row, prefix in zip(rows, prefixes):
        np.testing.assert_array_equal(row[3:], greedy(runtime_model(*canonical_of(parent)), list(prefix), 10))


def test_train_prefixes_are_seeded_windows_of_the_train_text(tmp_path):
    from megatron_puzzle.data.shards import load_split

    mod = _module()
    _data_dir(tmp_path)
    own = np.asarray(load_split(tmp_path / "data", "train")).astype(np.int64)
    a = mod.train_prefixes(tmp_path, rows=20, length=8, seed=0)
    assert a.shape == (20, 8)
    starts = [next(s for s in range(len(own) - 8) if np.array_equal(own[s:s + 8], row)) for row in a]
    assert starts == sorted(starts) and len(set(starts)) == 20  # distinct places, in the text's order
    np.testing.assert_array_equal(a, mod.train_prefixes(tmp_path, rows=20, length=8, seed=0))
    assert not np.array_equal(a, mod.train_prefixes(tmp_path, rows=20, length=8, seed=1))


def test_repeating_positions():
    mod = _module()
    row = np.array([5, 1, 2, 3, 1, 2, 3, 1, 9, 1, 2])
    # (1,2,3) and (2,3,1) recur at positions 6 and 7; (3,1,9), (1,9,1), (9,1,2) are new
    expected = [False] * 6 + [True, True, False, False, False]
    assert mod.repeating_positions(row, prefix=0).tolist() == expected
    assert mod.repeating_positions(row, prefix=7).tolist() == [False] * 7 + expected[7:]  # the prefix never counts


def test_repeating_positions_of_many_rows_are_each_rows_own():
    mod = _module()
    rows = np.random.default_rng(0).integers(0, 3, size=(5, 40))
    both = mod.repeating_positions(rows, prefix=4)
    assert both.shape == rows.shape and both.any()
    for row, flags in zip(rows, both):
        assert flags.tolist() == mod.repeating_positions(row, prefix=4).tolist()


def test_benchmarks_train_with_the_settings_the_run_used(tmp_path):
    """A run directory's GKD settings come from its config.yaml, a baseline's directory (no config.yaml)
    from the gkd/config.json its GKD stage recorded; with neither the benchmark stops rather than train
    with the built-in defaults."""
    import json

    _module()  # puts benchmarks/ on the path for _common
    from _common import run_gkd_settings

    run = tmp_path / "run"
    (run / "gkd").mkdir(parents=True)
    (run / "config.yaml").write_text("gkd:\n  dtype: fastest\n  loss: {lm: 1.0}\n")
    (run / "gkd" / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert run_gkd_settings(run) == {"dtype": "fastest", "loss": {"lm": 1.0}}
    baseline = run / "baselines" / "depth"
    (baseline / "gkd").mkdir(parents=True)
    (baseline / "gkd" / "config.json").write_text(json.dumps({"dtype": "fastest", "steps": 300}))
    assert run_gkd_settings(baseline) == {"dtype": "fastest", "steps": 300}
    with pytest.raises(SystemExit, match="neither config.yaml nor gkd/config.json"):
        run_gkd_settings(tmp_path / "empty")
