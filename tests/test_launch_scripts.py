"""The examples/ launch templates run real jobs: torchrun scripts on 2 CPU processes, SLURM templates rendered.

The torchrun test imports a tiny Llama (saved here with transformers) at TP 2 through the example
script and exports it with tools/export_megatron_to_hf.py; the exported weights must be exactly the
original ones. The SLURM
templates run with stand-in `srun`/`scontrol`/`sbatch` commands that record what they were asked to do.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _models import REPO, free_port

TORCHRUN_DIR = REPO / "examples" / "torchrun"
SLURM_DIR = REPO / "examples" / "slurm"
SCRIPTS = sorted(TORCHRUN_DIR.glob("*.sh")) + sorted(SLURM_DIR.glob("*.sh")) + sorted(SLURM_DIR.glob("*.sbatch")) \
    + sorted((REPO / "tools").glob("*.sh"))


def _env(tmp_path: Path, **extra) -> dict[str, str]:
    base = dict(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="",
                TORCHRUN=f"{shlex.quote(sys.executable)} -m torch.distributed.run", LOG_DIR=str(tmp_path / "logs"))
    return {**os.environ, **base, **extra}


def _run(cmd: list[str], env: dict[str, str], timeout: int = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def _tiny_llama(path: Path) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms are ones at init: randomise so a dropped norm would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_torchrun_script_imports_at_tp2_and_tool_exports(tmp_path):
    """import_hf.sh with 2 processes (TP 2), then tools/export_megatron_to_hf.py in one process (TP 1):
    the exported HF weights are exactly the original ones."""
    reference = _tiny_llama(tmp_path / "hf")
    env = _env(tmp_path)
    _run(["bash", str(TORCHRUN_DIR / "import_hf.sh"), str(tmp_path / "hf"), str(tmp_path / "ckpt"), "2"], env)
    assert (tmp_path / "ckpt" / "done").exists()
    _run([sys.executable, str(REPO / "tools" / "export_megatron_to_hf.py"), str(tmp_path / "ckpt"), str(tmp_path / "out")], env)
    exported = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        exported.update(load_file(f))
    assert set(exported) == set(reference)
    for name, t in reference.items():
        torch.testing.assert_close(exported[name].float(), t.float(), rtol=0, atol=0, msg=name)
    logs = list((tmp_path / "logs").glob("import-hf-*.log"))
    assert logs and "TP 2" in logs[0].read_text(), "the launcher keeps one log per launch, with every rank's output"


# --------------------------------------------------------------------------- SLURM templates

def _fake_bin(tmp_path: Path, srun_body: str) -> Path:
    """Stand-ins for srun / scontrol / sbatch that log their arguments (one per line) under tmp_path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "scontrol": 'echo "$@" >> "$FAKE_LOG/scontrol"\n[[ "$1 $2" == "show hostnames" ]] && printf "%s\\n" $FAKE_HOSTS\n',
        "srun": 'printf "%s\\n" "$@" > "$FAKE_LOG/srun"\n' + srun_body,
        "sbatch": 'n=$(( $(ls "$FAKE_LOG" | grep -c "^sbatch" || true) + 1 ))\nprintf "%s\\n" "$@" > "$FAKE_LOG/sbatch.$n"\n'
                  'echo "$((100 + n));cluster"\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\nset -eu\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _slurm_env(tmp_path: Path, srun_body: str = "", **extra) -> dict[str, str]:
    (tmp_path / "fake").mkdir()
    env = _env(tmp_path, FAKE_LOG=str(tmp_path / "fake"), SLURM_SUBMIT_DIR=str(REPO), **extra)
    env["PATH"] = f"{_fake_bin(tmp_path, srun_body)}:{env['PATH']}"
    return env


def test_sbatch_renders_a_multi_node_torchrun(tmp_path):
    env = _slurm_env(tmp_path, FAKE_HOSTS="gpu-a01 gpu-a02", SLURM_JOB_ID="4242", SLURM_NNODES="2",
                     SLURM_JOB_NODELIST="gpu-a[01-02]", GPUS_PER_NODE="8", TORCHRUN="torchrun",
                     CONTAINER_IMAGE="/images/puzzle.sqsh", CONTAINER_MOUNTS="/shared:/shared")
    out = _run(["bash", str(SLURM_DIR / "puzzle.sbatch"), "bld", "--run-dir", "/shared/run", "--config", "c.yaml"], env)
    argv = (tmp_path / "fake" / "srun").read_text().splitlines()
    assert "--ntasks-per-node=1" in argv and "--container-image=/images/puzzle.sqsh" in argv
    assert "--container-mounts=/shared:/shared" in argv
    launch = argv[argv.index("torchrun"):]
    port = 20000 + 4242 % 20000
    for flag in ("--nnodes=2", "--nproc-per-node=8", "--rdzv-id=4242", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint=gpu-a01:{port}"):
        assert flag in launch, (flag, launch)
    assert launch[launch.index("-m"):] == ["-m", "megatron_puzzle.cli", "bld", "--run-dir", "/shared/run", "--config", "c.yaml"]
    assert "2 node(s) x 8 GPU(s)" in out.stdout
    assert "--cpus-per-task=64" in argv, "srun does not inherit --cpus-per-task from #SBATCH (Slurm >= 22.05)"
    assert not (tmp_path / "fake" / "scontrol").read_text().count("requeue"), "no USR1, no requeue"
    # the directives a multi-node, resumable job needs
    header = [line for line in (SLURM_DIR / "puzzle.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    for d in ("--ntasks-per-node=1", "--requeue", "--signal=B:USR1@", "--open-mode=append", "--output=logs/slurm/"):
        assert any(d in line for line in header), d


def test_sbatch_runs_a_two_process_cpu_job(tmp_path):
    """srun stand-in that runs its command: the rendered torchrun rendezvous really starts 2 ranks."""
    run_body = 'while [[ "$1" == -* ]]; do shift; done\nexec "$@"\n'  # drop srun's own options, run the rest
    env = _slurm_env(tmp_path, run_body, FAKE_HOSTS="127.0.0.1", SLURM_JOB_ID="77", SLURM_NNODES="1",
                     SLURM_JOB_NODELIST="localhost", GPUS_PER_NODE="2", MASTER_PORT=str(free_port()))
    out = _run(["bash", str(SLURM_DIR / "puzzle.sbatch"), "search", "--help"], env)
    assert out.stdout.count("usage: megatron-puzzle search") == 2, out.stdout[-2000:]


def test_sbatch_usr1_makes_the_ranks_stop_then_requeues(tmp_path):
    """USR1 to the batch script (what --signal=B:USR1@300 sends): it creates the stop file the ranks poll,
    waits for srun to end (the ranks' checkpoint), and only then requeues the job."""
    stop = tmp_path / "stop-file"
    # srun stand-in: a "rank" that steps until it sees the stop file, then takes time to "checkpoint".
    srun_body = ('echo started > "$FAKE_LOG/started"\n'
                 'while [[ ! -e "$PUZZLE_PREEMPT_FILE" ]]; do sleep 0.05; done\n'
                 'sleep 0.5; echo saved > "$FAKE_LOG/saved"\n')
    env = _slurm_env(tmp_path, srun_body, FAKE_HOSTS="gpu-a01", SLURM_JOB_ID="4243", SLURM_NNODES="1",
                     SLURM_JOB_NODELIST="gpu-a01", GPUS_PER_NODE="8", TORCHRUN="torchrun",
                     SLURM_CPUS_PER_TASK="32", PUZZLE_PREEMPT_FILE=str(stop))
    scontrol = tmp_path / "bin" / "scontrol"  # fails a requeue that comes before the ranks saved
    scontrol.write_text(scontrol.read_text() + '[[ "$1" == requeue ]] && { [[ -e "$FAKE_LOG/saved" ]] || exit 9; } || true\n')
    stop.touch()  # left over from an earlier run: must not stop this one at once
    proc = subprocess.Popen(["bash", str(SLURM_DIR / "puzzle.sbatch"), "gkd", "--run-dir", "/shared/run"], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "fake" / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert not (tmp_path / "fake" / "saved").exists(), "a stale stop file stopped the new job"
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (out, err)
    assert (tmp_path / "fake" / "saved").exists()
    assert "requeue 4243" in (tmp_path / "fake" / "scontrol").read_text(), "requeued after the ranks saved"
    assert "--cpus-per-task=32" in (tmp_path / "fake" / "srun").read_text().splitlines()
    assert not stop.exists(), "the request is cleared for the requeued job"
    assert "USR1: asking the ranks to save and stop" in out


def test_submit_pipeline_chains_stages_with_dependencies(tmp_path):
    env = _slurm_env(tmp_path, SBATCH_ARGS="--account=abc")
    run_dir = str(tmp_path / "run")
    out = _run(["bash", str(SLURM_DIR / "submit_pipeline.sh"), "cfg.yaml", run_dir, "3"], env, cwd=tmp_path)
    calls = [(tmp_path / "fake" / f"sbatch.{i}").read_text().splitlines() for i in range(1, 5)]
    assert not (tmp_path / "fake" / "sbatch.5").exists()
    assert (tmp_path / "logs" / "slurm").is_dir(), "the --output directory must exist before sbatch"
    names = [c[c.index("-J") + 1] for c in calls]
    assert names == ["puzzle-prepare", "puzzle-bld", "puzzle-score", "puzzle-finish"]
    nodes = [c[c.index("--nodes") + 1] for c in calls]
    assert nodes == ["1", "3", "3", "3"]
    untils = []
    for i, c in enumerate(calls):
        assert "--account=abc" in c
        assert [a for a in c if a.startswith("--dependency=")] == ([] if i == 0 else [f"--dependency=afterok:{100 + i}"])
        cmd = c[c.index(str(SLURM_DIR / "puzzle.sbatch")) + 1:]
        assert cmd[:5] == ["run", "--config", "cfg.yaml", "--run-dir", run_dir], cmd
        untils.append(cmd[cmd.index("--until") + 1] if "--until" in cmd else None)
    assert untils == ["data", "bld", "score", None]
    from megatron_puzzle.pipeline.config import STAGES

    assert all(u in STAGES for u in untils if u), "the chain names the pipeline's real stages"
    assert "bld: job 102 (3 node(s))" in out.stdout


# --------------------------------------------------------------------------- GPU validation script

VALIDATE = REPO / "tools" / "validate_gpu.sh"


def _validate_tests() -> list[str]:
    text = VALIDATE.read_text()
    block = text[text.index("GPU_TESTS=(") + len("GPU_TESTS=("):]
    return [line.strip() for line in block[:block.index(")")].splitlines() if line.strip()]


def test_validate_gpu_names_real_tests_and_all_of_them():
    """Every pytest node id the script runs exists, and every GPU test is among them."""
    import ast

    ids = _validate_tests()
    assert ids and len(set(ids)) == len(ids)
    files: dict[str, set[str]] = {}
    for node in ids:
        path, _, name = node.partition("::")
        assert (REPO / path).is_file(), node
        if path not in files:
            tree = ast.parse((REPO / path).read_text())
            files[path] = {f.name for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")}
        assert name in files[path], f"{node}: no such test"
    for path, names in files.items():
        listed = {n.partition("::")[2] for n in ids if n.startswith(path + "::")}
        assert names == listed, f"{path}: tests the script does not run: {sorted(names - listed)}"


def test_validate_gpu_without_cuda_exits_3(tmp_path):
    proc = subprocess.run(["bash", str(VALIDATE), str(tmp_path / "r.json")], capture_output=True, text=True,
                          env=_env(tmp_path), timeout=120)
    assert proc.returncode == 3 and "no CUDA device" in proc.stderr, (proc.returncode, proc.stderr)


def test_validate_gpu_merges_outcomes_into_one_report(tmp_path):
    """The script's report step: the tests' figures plus each check's outcome, status and duration."""
    import json

    text = VALIDATE.read_text()
    code = text[text.index("<<'EOF'\n") + len("<<'EOF'\n"):text.index("\nEOF\n")]
    report, junit = tmp_path / "r.json", tmp_path / "r.junit.xml"
    report.write_text(json.dumps({"device": "NVIDIA H100", "results": {"nvml": {"samples": 12}}}))
    junit.write_text('<testsuites><testsuite><testcase name="test_a" time="1.5"/>'
                     '<testcase name="test_b" time="2"><failure message="x"/></testcase>'
                     '<testcase name="test_c" time="0"><skipped message="y"/></testcase></testsuite></testsuites>')
    subprocess.run([sys.executable, "-", str(report), str(junit), "1", "77"], input=code, text=True, check=True)
    data = json.loads(report.read_text())
    assert data["results"] == {"nvml": {"samples": 12}} and data["exit_status"] == 1 and data["seconds"] == 77
    assert data["outcomes"] == {"test_a": {"outcome": "passed", "seconds": 1.5},
                                "test_b": {"outcome": "failure", "seconds": 2.0},
                                "test_c": {"outcome": "skipped", "seconds": 0.0}}


# --------------------------------------------------------------------------- configs for real targets

CONFIGS = sorted((REPO / "examples" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_resolve_and_document_every_field(path):
    import yaml

    from megatron_puzzle.cost.scenario import load_scenario
    from megatron_puzzle.pipeline.config import load
    from megatron_puzzle.search.constraints import parse_constraint

    cfg = load(path)  # the run command's own validation, every stage section included
    load_scenario(cfg["scenario"])
    for c in cfg["search"]["constraints"]:
        parse_constraint(c)
    assert cfg["bld"]["tensor_parallel"] == cfg["tensor_parallel"], "BLD and the other stages shard the parent alike"
    assert set(yaml.safe_load(path.read_text())) == set(load(None)), "every section written out"
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):  # sections
            assert "#" in line, f"{path.name}: field without a comment: {line!r}"
