"""`megatron-puzzle plan`: the fake-tensor plan against real runs, the shipped configs, and the fit check."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "workers" / "plan_worker.py"
CONFIGS = REPO / "examples" / "configs"
STAGES = ["import", "bld", "score", "realize", "gkd"]
TINY = {"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2,
        "intermediate_size": 128}


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "megatron_puzzle", *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout)


def test_plan_matches_the_allocator_peak_of_the_real_step():
    """Fake tensors + MemTracker vs the same step on real tensors measured by the CPU allocator (torch.profiler)."""
    proc = subprocess.run([sys.executable, str(WORKER), "gkd", "bld", "score", "import"], capture_output=True,
                          text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for stage, (planned, measured) in result.items():
        assert measured > 1e6, (stage, measured)
        assert abs(planned - measured) <= 0.15 * measured, (stage, planned, measured)


def _shipped(name: str, tmp_path: Path, **override) -> Path:
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    for key, value in override.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _weights_per_rank(shape: dict, layers: int, tp: int, bytes_per_param: int = 2) -> int:
    """bf16 bytes of a Llama model's weights on one TP rank (PP 1), counted by hand."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    hd = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_kv_heads"] * hd
    per_layer = (h * (q + 2 * kv) + q * h + 3 * h * i) // tp + 2 * h  # qkv, o, gate+up+down; two norms whole
    return bytes_per_param * (2 * v * h // tp + layers * per_layer + h)  # embedding, output layer, final norm


def _check_plan(result: dict, tp: int, pp: int, world: int):
    assert set(result) >= {"device_memory_bytes", "stages"}
    assert result["device_memory_bytes"] == 80_000_000_000
    assert list(result["stages"]) == STAGES
    for stage, e in result["stages"].items():
        p = 1 if stage == "import" else pp  # import holds the parent per TP group; the others run at the config's PP
        assert e["tensor_parallel"] == tp and e["pipeline_parallel"] == p and e["data_parallel"] == world // (tp * p)
        parts = e["weights_bytes"] + e["gradients_bytes"] + e["optimizer_bytes"] + e["activations_bytes"]
        assert parts == e["peak_bytes"] and e["activations_bytes"] >= 0
        assert e["fits"] is True, (stage, e["peak_bytes"] / 1e9)
        assert e["peak_bytes"] <= 0.9 * result["device_memory_bytes"]


def test_plan_json_on_the_8b_config_cut_to_two_layers(tmp_path):
    from megatron_puzzle.plan.plan import SHAPES

    cfg = yaml.safe_load((CONFIGS / "llama3.1-8b-h100.yaml").read_text())
    tp, pp = cfg["tensor_parallel"], cfg.get("pipeline_parallel", 1)
    path = _shipped("llama3.1-8b-h100.yaml", tmp_path, parent_layers=2, pipeline_parallel=1)
    proc = _cli("plan", "--config", str(path), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    _check_plan(result, tp, 1, cfg["plan"]["world_size"])
    # the parent's weights on one rank, against a count by hand (bf16, TP-split matrices, whole norms)
    expected = _weights_per_rank(SHAPES["llama-3.1-8b"], 2, tp)
    got = result["stages"]["import"]["weights_bytes"]
    assert abs(got - expected) <= 1e-3 * expected, (got, expected)
    # the student's fp32 main grads are twice its bf16 weights, which are half of teacher + student (both bf16)
    g = result["stages"]["gkd"]
    assert g["teacher_dtype"] == "bfloat16"
    assert abs(g["gradients_bytes"] - g["weights_bytes"]) <= 1e-3 * g["weights_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama3.1-8b-h100.yaml", "llama3.1-70b-h100-fp8.yaml"])
def test_plan_json_on_the_shipped_configs(name):
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    proc = _cli("plan", "--config", str(CONFIGS / name), "--json", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_plan(json.loads(proc.stdout), cfg["tensor_parallel"], cfg.get("pipeline_parallel", 1),
                cfg["plan"]["world_size"])


def _tiny_gpu_config(**plan):
    from megatron_puzzle.pipeline import config as run_config

    return run_config.resolve({"scenario": "h100-fp8-128-1024", "plan": {"model": TINY, **plan},
                               "gkd": {"batch_size": 2, "seq_len": 64}, "bld": {"batch_size": 2, "seq_len": 64},
                               "score": {"batch_size": 2, "seq_len": 64}}, quick=True)


def test_run_stops_a_config_that_does_not_fit_before_any_work(tmp_path):
    from megatron_puzzle.pipeline.run import run_pipeline
    from megatron_puzzle.plan.plan import PlanError

    cfg = _tiny_gpu_config(device_memory=1000)  # bytes: not even the weights fit
    with pytest.raises(PlanError) as e:
        run_pipeline(tmp_path / "run", cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("stage import needs") and " over " in msg and "to fit, try" in msg
    assert "tensor_parallel: 2" in msg and "pipeline_parallel" not in msg  # import holds the parent per TP group
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing started


def test_check_fits_plans_gpu_scenarios_only():
    from megatron_puzzle.pipeline import config as run_config
    from megatron_puzzle.plan.plan import check_fits

    assert check_fits(run_config.resolve({}, quick=True)) is None  # the CPU scenario: no device memory to hold to
    result = check_fits(_tiny_gpu_config())
    assert set(result["stages"]) == set(STAGES)
    assert all(e["fits"] for e in result["stages"].values())


def test_stages_are_planned_at_the_pp_they_run_at():
    """BLD, score, realize and GKD run at the config's pipeline_parallel (BLD at bld.pipeline_parallel, kept
    equal to it), import at PP 1; a stage holds half the layers at PP 2, so its weights are under PP 1's."""
    from megatron_puzzle.pipeline import config as run_config
    from megatron_puzzle.plan.plan import plan_config, stage_layout

    def cfg(pp):
        return run_config.resolve({"scenario": "h100-fp8-128-1024", "pipeline_parallel": pp,
                                   "plan": {"model": dict(TINY, num_layers=4, vocab_size=64), "world_size": 4},
                                   "bld": {"batch_size": 2, "seq_len": 64, "layers_per_pass": 1},
                                   "score": {"batch_size": 2, "seq_len": 64}}, quick=True)

    assert {s: stage_layout(cfg(2), s) for s in STAGES} == {
        "import": (4, 1, 1, 4), "bld": (4, 1, 2, 2), "score": (4, 1, 2, 2), "realize": (4, 1, 2, 2), "gkd": (4, 1, 2, 2)}
    one, two = (plan_config(cfg(pp), ("import", "bld", "score"))["stages"] for pp in (1, 2))
    assert [two[s]["pipeline_parallel"] for s in ("import", "bld", "score")] == [1, 2, 2]
    assert two["import"]["weights_bytes"] == one["import"]["weights_bytes"]
    for s in ("bld", "score"):
        assert two[s]["weights_bytes"] < one[s]["weights_bytes"], s


def test_plan_cli_names_the_problem_in_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"plan": {"model": "llama-9b"}}))
    proc = _cli("plan", "--config", str(path), timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("megatron-puzzle plan: error: plan.model 'llama-9b' is not a known shape")


def test_plan_cli_exit_status_says_it_does_not_fit(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump({"scenario": "h100-fp8-128-1024", "parent_layers": None,
                                    "plan": {"model": TINY, "device_memory": 1000}}))
    proc = _cli("plan", "--config", str(path), "--stages", "import", timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "does not fit: stage import needs" in proc.stdout
    assert "| import | 1 x 1 x 1 |" in proc.stdout


def test_layout_keys_are_checked():
    from megatron_puzzle.pipeline import config as run_config
    from megatron_puzzle.plan.plan import PlanError, layout, parse_bytes

    with pytest.raises(run_config.ConfigError, match="pipeline_parallel must be a positive integer"):
        run_config.resolve({"pipeline_parallel": 0})
    cfg = run_config.resolve({"tensor_parallel": 2, "pipeline_parallel": 2, "plan": {"world_size": 16}})
    assert layout(cfg) == (16, 2, 2, 4)
    with pytest.raises(PlanError, match="not a multiple of tensor_parallel x pipeline_parallel = 4"):
        layout(run_config.resolve({"tensor_parallel": 2, "pipeline_parallel": 2, "plan": {"world_size": 6}}))
    assert parse_bytes("80GB") == 80_000_000_000 and parse_bytes("1 GiB") == 2**30 and parse_bytes(5) == 5
    with pytest.raises(PlanError, match="write it like 80GB"):
        parse_bytes("eighty")


def test_advice_names_bld_layers_per_pass_and_gkd_optimizer_offload():
    from megatron_puzzle.plan.plan import advice

    base = {"tensor_parallel": 8, "pipeline_parallel": 4, "data_parallel": 1, "weights_bytes": 10, "gradients_bytes": 10,
            "activations_bytes": 30}
    bld = dict(base, optimizer_bytes=20, peak_bytes=70, layers_per_pass=4)
    assert advice({}, "bld", bld).startswith("bld.layers_per_pass: 2")
    assert "layers_per_pass" not in advice({}, "bld", dict(bld, layers_per_pass=1))
    gkd = dict(base, optimizer_bytes=27, peak_bytes=77, recompute=True, distributed_optimizer=True)
    assert "gkd.optimizer_cpu_offload: true" in advice({}, "gkd", gkd, limit=72)  # 77 - 27 fits in 72
    assert "optimizer_cpu_offload" not in advice({}, "gkd", gkd, limit=40)  # offload alone would not fit it
    assert "optimizer_cpu_offload" not in advice({}, "gkd", dict(gkd, optimizer_cpu_offload=True), limit=72)
