"""benchmarks/compare_runs.py: the rows and the spread it prints come from the runs' own files."""

from __future__ import annotations

import importlib.util
import json

import pytest

from _models import REPO


def _module():
    spec = importlib.util.spec_from_file_location("compare_runs", REPO / "benchmarks" / "compare_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_run(path, speedup, acc, *, matched=True):
    path.mkdir()
    child = {"decode_speedup": speedup, "decode_speedup_low": speedup * 0.99, "decode_speedup_high": speedup * 1.01,
             "next_token_accuracy_retained": acc, "kl_to_parent": 1.0 - acc, "repeated_3grams": 0.1,
             "decode_tokens_per_s": 100 * speedup}
    depth = {"decode_speedup": speedup * 0.97, "decode_ratio_to_child": 0.97, "matched": matched,
             "next_token_accuracy_retained": acc - 0.05, "kl_to_parent": 1.2}
    rep = {"parent": {"decode_tokens_per_s": 100.0}, "child": child, "baseline_depth": depth,
           "goal": {"met": speedup >= 2 and acc >= 0.9}}
    (path / "report.json").write_text(json.dumps(rep))
    (path / "timings.json").write_text(json.dumps({"bld": 600.0, "eval": 900.0}))
    (path / "child").mkdir()
    (path / "child" / "aim.json").write_text(json.dumps({"target": 2.0, "tries": [{}, {}]}))


def test_rows_and_spread(tmp_path, capsys):
    mod = _module()
    speeds, accs = [2.0, 2.1, 2.3], [0.70, 0.80, 0.75]
    runs = []
    for i, (s, a) in enumerate(zip(speeds, accs)):
        _fake_run(tmp_path / f"r{i}", s, a, matched=i != 1)
        runs.append(str(tmp_path / f"r{i}"))
    out_json = tmp_path / "out.json"
    assert mod.main(runs + ["--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    got = json.loads(out_json.read_text())
    mean = sum(speeds) / 3
    assert got["spread"]["decode_speedup"]["mean"] == pytest.approx(mean)
    assert got["spread"]["decode_speedup"]["max_dev_pct"] == pytest.approx(100 * (2.3 - mean) / mean)
    assert got["spread"]["accuracy_retained"]["min"] == pytest.approx(0.70)
    assert got["runs"][0]["minutes"] == pytest.approx(25.0) and got["runs"][0]["realize_tries"] == 2
    assert "| r1 | 25.0 | 2 | 2.10x [2.08, 2.12] | 80.0% |" in printed
    assert "75.0% (0.97x, unmatched)" in printed and "65.0% (0.97x)" in printed


def test_unfinished_run_is_named(tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(SystemExit, match="no report.json"):
        _module().main([str(tmp_path / "r")])
