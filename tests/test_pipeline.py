"""The main job: config resolution, the quick profile end to end, and kill + resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_puzzle.pipeline import config as run_config
from megatron_puzzle.pipeline.stages import OUTPUTS, is_complete

CLI = [sys.executable, "-m", "megatron_puzzle"]
ENV = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")


def test_config_defaults_and_errors(tmp_path):
    cfg = run_config.resolve({"bld": {"steps": 3}, "search": {"constraints": ["memory<=0.5x"]}})
    assert cfg["bld"]["steps"] == 3 and cfg["bld"]["seq_len"] == run_config.DEFAULTS["bld"]["seq_len"]
    assert cfg["search"]["constraints"] == ["memory<=0.5x"]
    quick = run_config.resolve({}, quick=True)
    assert quick["parent_layers"] == 4 and quick["data"]["source"] == "sample"
    assert run_config.resolve({}, profile="quick") == quick
    long = run_config.resolve({"gkd": {"lr": 1e-3}}, profile="long")  # the user's values still win
    assert long["gkd"]["lr"] == 1e-3 and long["gkd"]["steps"] == run_config.LONG["gkd"]["steps"]
    assert long["gkd"]["skip_repeats"] and not run_config.resolve()["gkd"].get("skip_repeats", False)
    assert long["report"]["baselines"] == ["depth"] and long["report"]["eval_tokens"] == 4096
    # both profiles choose among the attention-floor candidates by measured KL
    for cfg in (long, run_config.resolve(None)):
        assert (cfg["search"]["attention_floors"], cfg["realize"]["solution"]) == ([0.25, 0.35, 0.45], "best")
    with pytest.raises(run_config.ConfigError, match="unknown profile 'fast'; the profiles are default, quick, long"):
        run_config.resolve({}, profile="fast")
    with pytest.raises(run_config.ConfigError, match="unknown config section"):
        run_config.resolve({"bldd": {}})
    with pytest.raises(run_config.ConfigError, match="section bld"):
        run_config.resolve({"bld": {"stepz": 3}})
    with pytest.raises(run_config.ConfigError, match="tensor_parallel"):
        run_config.resolve({"tensor_parallel": 0})
    bad = tmp_path / "bad.yaml"
    bad.write_text("bld: [1, 2\n")
    with pytest.raises(run_config.ConfigError, match="not valid YAML"):
        run_config.load(bad)


def test_pipeline_parallel_reaches_bld_and_score(tmp_path, monkeypatch):
    """The run config's pipeline_parallel is the PP size of BLD and scoring (as of GKD)."""
    from megatron_puzzle.distill import bld_run
    from megatron_puzzle.pipeline import stages
    from megatron_puzzle.score import stage as score_stage

    cfg = run_config.resolve({"pipeline_parallel": 2})
    assert cfg["bld"]["pipeline_parallel"] == 2
    with pytest.raises(run_config.ConfigError, match="bld.pipeline_parallel=1 differs from pipeline_parallel=2"):
        run_config.resolve({"pipeline_parallel": 2, "bld": {"pipeline_parallel": 1}})
    seen = {}
    monkeypatch.setattr(score_stage, "run_score", lambda run, c: seen.setdefault("score", c))
    monkeypatch.setattr(bld_run, "run_bld", lambda run, c: seen.setdefault("bld", c))
    stages.stage_score(tmp_path, cfg)
    stages.stage_bld(tmp_path, cfg)
    assert seen["score"].pipeline_parallel == 2 and seen["bld"].bld.pipeline_parallel == 2


def test_run_refuses_bad_config_with_exit_code_2(tmp_path):
    (tmp_path / "c.yaml").write_text("gkd: {loss: {cosine: 1, foo: 2}}\n")
    p = subprocess.run(CLI + ["run", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "r")],
                       capture_output=True, text=True, env=ENV)
    assert p.returncode == 2 and "foo" in p.stderr and not (tmp_path / "r").exists()
    p = subprocess.run(CLI + ["run", "--quick", "--profile", "long", "--run-dir", str(tmp_path / "r")],
                       capture_output=True, text=True, env=ENV)
    assert p.returncode == 2 and "two profiles" in p.stderr and not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One uninterrupted `megatron-puzzle run --quick` (every stage, report included)."""
    run = tmp_path_factory.mktemp("quick") / "run"
    p = subprocess.run(CLI + ["run", "--quick", "--run-dir", str(run)], capture_output=True, text=True, env=ENV,
                       timeout=1500)
    assert p.returncode == 0, p.stderr[-5000:]
    return run, p


def test_quick_profile_runs_every_stage(quick_run):
    run, proc = quick_run
    assert all(is_complete(run, s) for s in run_config.STAGES)
    report = json.loads((run / "report.json").read_text())
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "next_token_accuracy", "kl_to_parent", "lm_loss"):
        assert key in report["parent"] and key in report["child"]
    assert report["child"]["decode_speedup"] > 0
    assert (run / "report.md").exists() and list(run.glob("*.png"))
    hf = run / "export" / "config.json"
    assert json.loads(hf.read_text())["model_type"] == "nemotron-nas"
    assert "decode speedup" in proc.stdout
    # a second run finds every stage complete and does no work
    t0 = time.perf_counter()
    p = subprocess.run(CLI + ["run", "--quick", "--run-dir", str(run)], capture_output=True, text=True, env=ENV)
    assert p.returncode == 0 and "running" not in p.stderr and time.perf_counter() - t0 < 60


def _tensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.rglob("*.safetensors")):
        out.update({f"{f.relative_to(path)}:{k}": v for k, v in load_file(f).items()})
    return out


def _checkpoint_tensors(path: Path) -> dict:
    from megatron_puzzle.convert.megatron_layout import canonical_state
    from megatron_puzzle.model import checkpoint

    return canonical_state(checkpoint.load(path))


def test_killed_run_resumes_to_the_same_result(quick_run, tmp_path, mcore):
    """Kill `run` in the middle of BLD (SIGKILL), rerun the same command: same library, scores,
    solution, child and uptrained child as the uninterrupted run."""
    ref, _ = quick_run
    run = tmp_path / "run"
    run.mkdir()
    # import, data and measured costs are reused (costs are timings: the search must see the same ones)
    for stage in ("import", "data", "measure"):
        shutil.copytree(ref / OUTPUTS[stage], run / OUTPUTS[stage])
    cmd = CLI + ["run", "--quick", "--run-dir", str(run), "--until", "export"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:  # wait until BLD has finished one entry
        if any((run / "library").glob("layer_*/*/done")):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not is_complete(run, "bld")

    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=1500)
    assert p.returncode == 0, p.stderr[-5000:]
    # the kill may land inside a write: its temporaries are swept, never read as results
    assert not [f for f in run.rglob("*") if f.name.startswith(".") and f.name.endswith(".tmp")]
    a, b = _tensors(ref / "library"), _tensors(run / "library")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    sa, sb = (json.loads((r / "score" / "scores.json").read_text()) for r in (ref, run))
    assert _close(sa["layers"], sb["layers"])
    va, vb = (json.loads((r / "search" / "solutions.json").read_text())["solutions"][0]["variants"] for r in (ref, run))
    assert va == vb
    for sub in ("child", "gkd/final"):
        x, y = _checkpoint_tensors(ref / sub), _checkpoint_tensors(run / sub)
        assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-6, rtol=0) for k in x)


def _close(a, b, tol=1e-6):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= tol * max(1.0, abs(a))
    return a == b


def test_example_default_config_is_the_built_in_default():
    from megatron_puzzle.pipeline.config import REPO_EXAMPLE

    assert run_config.load(REPO_EXAMPLE) == run_config.resolve({})


def test_set_aside_takes_a_stages_caches_too(tmp_path):
    """--from eval must not leave the baselines and cached metrics for the redone stage to reuse."""
    from megatron_puzzle.pipeline.stages import set_aside

    run = tmp_path
    for d in ("eval", "baselines/depth", "gkd"):
        (run / d).mkdir(parents=True)
    for f in ("report.json", "report.md", "comparison.png", "baselines/depth/arch.json", "gkd/done"):
        (run / f).write_text("x")
    dest = set_aside(run, ["export", "eval"])
    assert sorted(p.name for p in dest.iterdir()) == ["baselines", "comparison.png", "eval", "report.json", "report.md"]
    assert (dest / "baselines" / "depth" / "arch.json").exists()
    assert (run / "gkd" / "done").exists() and not (run / "baselines").exists()


def test_from_stage_sets_outputs_aside_and_redoes_them(quick_run, tmp_path):
    ref, _ = quick_run
    run = tmp_path / "run"
    for stage in ("import", "data", "init", "bld", "score", "measure", "search", "realize"):
        shutil.copytree(ref / OUTPUTS[stage], run / OUTPUTS[stage])
    shutil.copy(ref / "config.yaml", run / "config.yaml")
    p = subprocess.run(CLI + ["run", "--quick", "--run-dir", str(run), "--from", "search", "--until", "realize"],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (aside,) = (run / "previous").iterdir()  # nothing computed is deleted
    assert (aside / "search" / "solutions.json").exists() and (aside / "child" / "realize.json").exists()
    old, new = (json.loads((d / "search" / "solutions.json").read_text()) for d in (aside, run))
    assert new["solutions"][0]["variants"] == old["solutions"][0]["variants"]
    assert is_complete(run, "realize") and not (run / "gkd").exists()


# --------------------------------------------------------------------------- several ranks (torchrun)

TORCHRUN_ENV = dict(ENV, OMP_NUM_THREADS="1")


def _torchrun(args: list[str], *, script: list[str] | None = None, env: dict | None = None, timeout: int = 1800):
    from megatron_puzzle.model.parallel import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           *(script or ["-m", "megatron_puzzle"]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or TORCHRUN_ENV, timeout=timeout)


def _temporaries(run: Path) -> list[Path]:
    return [f for f in run.rglob("*") if f.name.startswith(".") and f.name.endswith((".tmp", ".old"))]


def _scores(run: Path) -> dict:
    return json.loads((run / "score" / "scores.json").read_text())


def _assert_same_scores(a: dict, b: dict, tol: float = 1e-4) -> None:
    """Every library entry scored, by both runs, to within float tolerance."""
    assert [sorted(layer) for layer in a["layers"]] == [sorted(layer) for layer in b["layers"]]
    assert sum(len(layer) for layer in a["layers"]) > 0
    assert _close(a["layers"], b["layers"], tol) and _close(a["parent"], b["parent"], tol)


def test_two_ranks_from_score_match_one_rank_and_a_failing_rank_stops_the_launch(quick_run, tmp_path):
    """CI's small version: from the single-process run's library, score..search under torchrun on 2 ranks.

    A rank made to raise in the middle of the score stage stops the whole launch within 30 s with its
    traceback; the rerun completes, leaves no temporaries and scores every entry as one process did.
    """
    ref, _ = quick_run
    run = tmp_path / "run"
    for stage in ("import", "data", "init", "bld"):
        shutil.copytree(ref / OUTPUTS[stage], run / OUTPUTS[stage])
    args = ["run", "--quick", "--run-dir", str(run), "--until", "search"]
    worker = [str(Path(__file__).parent / "workers" / "pipeline_fail.py")]
    t0 = time.time()
    p = _torchrun(args, script=worker, env=dict(TORCHRUN_ENV, FAIL_RANK="1"), timeout=600)
    end = time.time()
    assert p.returncode != 0 and "injected failure in the score stage" in p.stderr, p.stderr[-3000:]
    failed_at = float(p.stderr.split("FAILING rank 1 at ")[1].split()[0])
    assert t0 < failed_at and end - failed_at < 30, f"the launch took {end - failed_at:.1f} s to stop"
    assert "Traceback" in p.stderr  # a bug keeps its traceback
    assert not is_complete(run, "score")

    p = _torchrun(args, timeout=900)
    assert p.returncode == 0, p.stderr[-5000:]
    assert all(is_complete(run, s) for s in ("score", "measure", "search"))
    assert not _temporaries(run)
    _assert_same_scores(_scores(ref), _scores(run))


@pytest.mark.slow
def test_quick_pipeline_on_two_ranks(quick_run, tmp_path):
    """The whole quick pipeline under `torchrun --nproc-per-node 2`, then again `--from bld`: no race, no
    temporaries left, every library entry scored as the single-process run scored it."""
    ref, _ = quick_run
    run = tmp_path / "run"
    p = _torchrun(["run", "--quick", "--run-dir", str(run)])
    assert p.returncode == 0, p.stderr[-5000:]
    assert all(is_complete(run, s) for s in run_config.STAGES) and not _temporaries(run)
    assert p.stdout.count("decode speedup") == 1  # the summary comes from rank 0 alone
    _assert_same_scores(_scores(ref), _scores(run))

    p = _torchrun(["run", "--quick", "--run-dir", str(run), "--from", "bld"])
    assert p.returncode == 0, p.stderr[-5000:]
    assert all(is_complete(run, s) for s in run_config.STAGES) and not _temporaries(run)
    (aside,) = (run / "previous").iterdir()  # set aside once, by rank 0
    assert (aside / "library" / "done").exists() and (aside / "score" / "scores.json").exists()
    _assert_same_scores(_scores(ref), _scores(run))
