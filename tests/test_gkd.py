"""GKD: loss terms against float64 references (vocab-parallel at TP 2 included), TP 2 = TP 1,
exact resume after a crash, clear FP8-on-CPU error, and a child that gets closer to its parent."""

import csv
import json
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _models import REPO, torchrun

sys.path.insert(0, str(REPO / "tests" / "workers"))
from gkd_worker import VOCAB, fixed_logits, make_run  # noqa: E402

from megatron_puzzle.distill import train_utils  # noqa: E402
from megatron_puzzle.model import losses  # noqa: E402
from megatron_puzzle.convert.megatron_layout import canonical_state  # noqa: E402
from megatron_puzzle.distill.gkd import GKDConfig, latest_checkpoint, run_gkd  # noqa: E402

WORKER = REPO / "tests" / "workers" / "gkd_worker.py"
# Small and fast: 4-layer hidden-64 parent, 4 x 32-token sequences per step.
TINY = dict(batch_size=4, seq_len=32, lr=3e-3, min_lr=3e-4, warmup=2, eval_tokens=512, progress=False)


# --------------------------------------------------------------------------- float64 references

def ref_kl(t, s, temperature=1.0):
    p = F.softmax(t.double() / temperature, -1)
    return (p * (p.log() - F.log_softmax(s / temperature, -1))).sum(-1).mean() * temperature ** 2


def ref_ce(s, targets):
    return -F.log_softmax(s, -1).gather(-1, targets.unsqueeze(-1)).mean()


def ref_cosine(student, teacher):
    total = 0.0
    for s, t in zip(student, teacher):
        s, t = s.double(), t.double()
        cos = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
        total = total + (1 - cos).mean()
    return total


def _grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


def test_loss_terms_match_float64(mcore):
    t, s, targets = fixed_logits()
    for temp in (1.0, 2.0):
        v, g = _grad(lambda x: losses.vocab_parallel_kl(t, x, temperature=temp), s)
        rv, rg = _grad(lambda x: ref_kl(t, x, temp), s.double())
        assert abs(v.item() - rv.item()) < 1e-5 and (g.double() - rg).abs().max() < 1e-6
    v, g = _grad(lambda x: losses.vocab_parallel_cross_entropy(x, targets), s)
    rv, rg = _grad(lambda x: ref_ce(x, targets), s.double())
    assert abs(v.item() - rv.item()) < 1e-5 and (g.double() - rg).abs().max() < 1e-6
    assert torch.equal(losses.vocab_parallel_argmax(s), s.argmax(-1))

    g = torch.Generator().manual_seed(1)
    hs = [torch.randn(5, 2, 16, generator=g) for _ in range(3)]
    ht = [h + 0.5 * torch.randn(5, 2, 16, generator=g) for h in hs]
    ht[2] = hs[2].clone()  # an identical layer (e.g. both no-op) contributes 0
    value = losses.cosine_term(hs, ht)
    assert abs(value.item() - ref_cosine(hs, ht).item()) < 1e-6
    x = [h.clone().requires_grad_(True) for h in hs]
    losses.cosine_term(x, ht).backward()
    xr = [h.double().requires_grad_(True) for h in hs]
    ref_cosine(xr, ht).backward()
    assert max((a.grad.double() - b.grad).abs().max().item() for a, b in zip(x, xr)) < 1e-6

    # the weighted sum uses only the terms with a weight
    w = losses.LossWeights(cosine=0.5, kl=2.0, lm=0.25)
    total, terms = losses.gkd_loss(s, t, hs, ht, targets, w)
    expect = 0.5 * ref_cosine(hs, ht) + 2.0 * ref_kl(t, s.double()) + 0.25 * ref_ce(s.double(), targets)
    assert abs(total.item() - expect.item()) < 1e-5 and set(terms) == {"cosine", "kl", "lm"}
    with pytest.raises(ValueError, match="all loss weights are 0"):
        losses.LossWeights(0, 0, 0)


def _old_lr_at(step, *, lr, min_lr, warmup, total):
    """The schedule GKD computed itself before Megatron-Core's scheduler drove it (float64)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def test_megatrons_scheduler_gives_the_warmup_and_cosine_curve(mcore):
    """OptimizerParamScheduler stepped once before each update: the old curve's warm-up exactly, its
    cosine one step further on (the peak is no longer held for two steps; the last step reaches
    min_lr), the same in float64 to 1e-15; weight decay off for norms (wd_mult 0)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from _models import tiny_parent

    from megatron_puzzle.model.gpt import build_model

    model = build_model(tiny_parent(num_layers=1))
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1.0, min_lr=0.1, weight_decay=0.01), [ddp])
    for warmup, total in ((4, 20), (0, 7), (3, 3), (5, 2)):
        sched = train_utils.lr_scheduler(opt, lr=1.0, min_lr=0.1, warmup=warmup, total=total, weight_decay=0.01)
        got = []
        for step in range(total + 2):
            sched.step(1)
            got.append(opt.param_groups[0]["lr"])
            assert {g["lr"] for g in opt.param_groups} == {got[-1]}
            assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.01}
        for step, value in enumerate(got):
            if step < warmup:
                expect = _old_lr_at(step, lr=1.0, min_lr=0.1, warmup=warmup, total=total)
            else:
                expect = _old_lr_at(step + 1, lr=1.0, min_lr=0.1, warmup=warmup, total=max(total, warmup + 1))
            assert abs(value - expect) < 1e-15, (warmup, total, step, value, expect)
        if total > warmup:
            assert got[total - 1] == 0.1  # the last step reaches min_lr
            assert warmup == 0 or got[warmup - 1] == 1.0  # the peak, once
        # its state (what a checkpoint keeps) puts a new scheduler at the same point
        again = train_utils.lr_scheduler(opt, lr=1.0, min_lr=0.1, warmup=warmup, total=total, weight_decay=0.01)
        again.load_state_dict(sched.state_dict())
        assert again.num_steps == total + 2 and opt.param_groups[0]["lr"] == got[-1]
    assert not hasattr(train_utils, "lr_at")


def test_the_optimizer_load_gaps_worked_around_are_still_in_megatron(mcore, tmp_path):
    """Each gap train_utils fills in Megatron-Core's distributed-optimizer checkpoint load (torch Adam,
    no TE/apex) is still there: when one closes, this test fails and its workaround can go. With
    the workarounds, a reloaded optimizer takes the same next step as the one that saved."""
    import copy

    from megatron.core.dist_checkpointing.core import CheckpointingException
    from _models import tiny_parent

    from megatron_puzzle.distill.gkd import build_engine, train_step
    from megatron_puzzle.model import checkpoint
    from megatron_puzzle.model.gpt import build_model

    cfg = GKDConfig(shard_optimizer=True, **TINY)  # the distributed optimizer at DP 1

    def engine():
        torch.manual_seed(0)
        student, teacher = build_model(tiny_parent(num_layers=2)), build_model(tiny_parent(num_layers=2))
        teacher.requires_grad_(False)
        return build_engine(student, teacher, cfg)

    def request(e):
        return train_utils.sharded_optimizer_state(e.optimizer, e.stage.student.sharded_state_dict(), is_loading=True)

    batch = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(0))
    # gap 1: a fresh optimizer (no Adam state yet) cannot describe its state for a load
    with pytest.raises(AssertionError):
        request(engine())
    saved = engine()
    for _ in range(2):
        train_step(saved, batch, cfg, lr=1e-3)
    # the default format cannot be saved at all
    with pytest.raises(CheckpointingException, match="flattened_range is not supported"):
        saved.optimizer.sharded_state_dict(saved.stage.student.sharded_state_dict(), is_loading=False,
                                           metadata={"distrib_optim_sharding_type": "fully_sharded_model_space"})
    opt_sd = train_utils.sharded_optimizer_state(saved.optimizer, saved.stage.student.sharded_state_dict(),
                                                 is_loading=False)
    checkpoint.save(saved.stage.student, tmp_path / "ckpt", extra_state={"optimizer": opt_sd})

    loaded = engine()
    train_utils.init_optimizer_state(loaded.optimizer)
    extras = checkpoint.load_into(loaded.stage.student, tmp_path / "ckpt", extra_state={"optimizer": request(loaded)})
    sd = extras["optimizer"]
    (sub,) = train_utils._subs(loaded.optimizer)
    # gap 3: Megatron's own load copies a 'step' the fully_reshardable state never has
    with pytest.raises(KeyError, match="step"), torch.no_grad():
        sub.load_state_dict(copy.deepcopy(sd))
    common = {k: v for k, v in copy.deepcopy(sd).items() if not k.startswith("param_state")}
    sub.load_state_dict(common)
    # gap 4: after a load every parameter shares one step tensor (torch Adam would advance it per parameter)
    assert len(sub.optimizer.state) > 1 and len({id(st["step"]) for st in sub.optimizer.state.values()}) == 1
    # gap 2: main params are views of grad-requiring parameters: in-place copies need no_grad
    main = sub.optimizer.param_groups[0]["params"][0]
    with pytest.raises(RuntimeError, match="view of a leaf Variable that requires grad"):
        main.copy_(main.detach().clone())

    resumed = engine()
    train_utils.init_optimizer_state(resumed.optimizer)
    extras = checkpoint.load_into(resumed.stage.student, tmp_path / "ckpt", extra_state={"optimizer": request(resumed)})
    train_utils.load_optimizer_state(resumed.optimizer, extras["optimizer"], 2)
    assert train_utils.step_count(resumed.optimizer) == 2
    steps = {id(st["step"]) for inner in train_utils._inner(resumed.optimizer) for st in inner.state.values()}
    assert len(steps) == len(sub.optimizer.state)
    a, b = train_step(saved, batch, cfg, lr=1e-3), train_step(resumed, batch, cfg, lr=1e-3)
    assert abs(a["loss"] - b["loss"]) < 1e-7 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-7
    a, b = train_step(saved, batch, cfg, lr=1e-3), train_step(resumed, batch, cfg, lr=1e-3)
    assert abs(a["loss"] - b["loss"]) < 1e-7  # the step after: the moments (and step counts) were restored


# --------------------------------------------------------------------------- training runs

@pytest.fixture(scope="module")
def base_run(tmp_path_factory, mcore):
    return make_run(tmp_path_factory.mktemp("gkd") / "base")


def _copy_run(base, dest):
    for name in ("parent", "child", "data"):
        shutil.copytree(base / name, dest / name)
    return dest


def _log(run):
    with open(run / "gkd" / "log.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]  # "": not on that step


def test_resume_continues_the_same_curve_and_gkd_lowers_kl(base_run, tmp_path):
    # all held-out tokens: top-1 agreement on 512 random tokens moves by single tokens
    cfg = GKDConfig(steps=6, save_interval=3, **{**TINY, "eval_tokens": 2048})
    straight = _copy_run(base_run, tmp_path / "straight")
    result = run_gkd(straight, cfg)
    # the child ends closer to its parent on held-out tokens
    assert result["after"]["kl_div"] < 0.9 * result["before"]["kl_div"]
    assert result["after"]["top1_agreement"] > result["before"]["top1_agreement"]

    crashed = _copy_run(base_run, tmp_path / "crashed")

    def crash(step, record):
        if step == 3:
            raise KeyboardInterrupt("simulated kill after step 3")

    with pytest.raises(KeyboardInterrupt):
        run_gkd(crashed, cfg, on_step=crash)
    assert latest_checkpoint(crashed / "gkd" / "ckpt").name == "step_0000003"
    # another config on a partial run is refused, naming what changed
    with pytest.raises(ValueError, match="other settings.*lr"):
        run_gkd(crashed, GKDConfig(steps=6, save_interval=3, **{**TINY, "lr": 1e-3}))
    # a half-written later checkpoint (no done marker) is ignored on resume
    (crashed / "gkd" / "ckpt" / "step_0000004").mkdir()
    resumed = run_gkd(crashed, cfg)

    a, b = _log(straight), _log(crashed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss", "cosine", "kl", "grad_norm", "lr"):
            assert abs(ra[key] - rb[key]) <= 1e-6, (ra["step"], key, ra[key], rb[key])
    assert abs(resumed["after"]["kl_div"] - result["after"]["kl_div"]) <= 1e-6
    assert resumed["before"] == result["before"]

    # a finished stage is kept, without its resume checkpoints
    assert not (crashed / "gkd" / "ckpt").exists()
    assert run_gkd(crashed, cfg) == resumed


def test_tp2_matches_tp1_and_vocab_parallel_losses(base_run, tmp_path):
    # step 2 is an on-policy step: the child's continuations (logits gathered over TP) and their terms
    # half its rows continue prompts the parent wrote (sampled; TP ranks must draw alike)
    cfg = GKDConfig(steps=3, save_interval=0, unlikelihood=1.0, on_policy_every=2, on_policy_prefix=8,
                    on_policy_parent_rows=0.5, **{**TINY, "loss": {"cosine": 1.0, "kl": 1.0, "lm": 0.5}})
    tp1 = _copy_run(base_run, tmp_path / "tp1")
    run_gkd(tp1, cfg)
    tp2 = _copy_run(base_run, tmp_path / "tp2")
    out = tmp_path / "tp2.json"
    cfg2 = {**cfg.to_dict(), "tp": 2}
    torchrun(WORKER, 2, "--tp", "2", "--run-dir", str(tp2), "--config", json.dumps(cfg2), "--out", str(out))
    res = json.loads(out.read_text())

    # vocab-parallel KL / CE / argmax over 2 shards against float64 full-vocabulary math
    t, s, targets = fixed_logits()
    rv, rg = _grad(lambda x: ref_kl(t, x, 2.0), s.double())
    assert abs(res["losses"]["kl"]["value"] - rv.item()) < 1e-5
    assert (torch.tensor(res["losses"]["kl"]["grad"]).double() - rg).abs().max() < 1e-6
    rv, rg = _grad(lambda x: ref_ce(x, targets), s.double())
    assert abs(res["losses"]["ce"]["value"] - rv.item()) < 1e-5
    assert (torch.tensor(res["losses"]["ce"]["grad"]).double() - rg).abs().max() < 1e-6
    assert torch.equal(torch.tensor(res["losses"]["argmax"]), s.argmax(-1))
    # the cosine term over 2 sequence-parallel slices equals the whole sequence's, gradients too
    from gkd_worker import sequence_hidden

    hs, ht = sequence_hidden()
    xr = [h.double().requires_grad_(True) for h in hs]
    ref = ref_cosine(xr, ht)
    ref.backward()
    assert abs(res["losses"]["cosine_sp"]["value"] - ref.item()) < 1e-6
    for g, r in zip(res["losses"]["cosine_sp"]["grad"], xr):
        assert (torch.tensor(g).double() - r.grad).abs().max() < 1e-6
    assert VOCAB % 2 == 0

    # the first steps' losses of a TP 2 run equal TP 1's
    a, b = _log(tp1), _log(tp2)
    assert len(a) == len(b) == 3
    assert [sorted(r) for r in a] == [sorted(r) for r in b] and "own_repeats" in a[1] and "lm" not in a[1]
    for ra, rb in zip(a, b):
        for key in set(ra) - {"step", "tokens", "lr", "tokens_per_s"}:
            assert abs(ra[key] - rb[key]) <= 1e-5, (ra["step"], key, ra[key], rb[key])


# --------------------------------------------------------------------------- user errors

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp8_on_cpu_fails_at_start(tmp_path, capsys):
    from megatron_puzzle.cli import main

    assert main(["gkd", "--run-dir", str(tmp_path / "run"), "--fp8", "hybrid"]) == 2
    err = capsys.readouterr().err
    assert "gkd: error:" in err and "GPU" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_sequence_parallel_on_cpu_fails_at_start(tmp_path, capsys):
    from megatron_puzzle.cli import main

    assert main(["gkd", "--run-dir", str(tmp_path / "run"), "--tp", "2", "--sequence-parallel"]) == 2
    err = capsys.readouterr().err
    assert "Transformer Engine norms" in err and "drop --sequence-parallel" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="needs tp >= 2"):
        GKDConfig(sequence_parallel=True)


def test_bad_settings_are_named(tmp_path, capsys):
    from megatron_puzzle.cli import main

    with pytest.raises(ValueError, match="unknown loss term"):
        GKDConfig(loss={"mse": 1.0})
    with pytest.raises(ValueError, match="min_lr"):
        GKDConfig(lr=1e-5, min_lr=1e-4)
    (tmp_path / "gkd.yaml").write_text("gkd:\n  steps: 7\n  loss: {lm: 1.0}\n")
    cfg = GKDConfig.from_yaml(tmp_path / "gkd.yaml")
    assert cfg.steps == 7 and cfg.loss == {"cosine": 1.0, "kl": 1.0, "lm": 1.0}
    (tmp_path / "bad.yaml").write_text("stpes: 7\n")
    assert main(["gkd", "--run-dir", str(tmp_path), "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "stpes" in capsys.readouterr().err
    # missing inputs: the error names the stage to run
    assert main(["gkd", "--run-dir", str(tmp_path / "empty"), "--no-progress"]) == 2
    assert "megatron-puzzle import" in capsys.readouterr().err


def _final_weights(run):
    from megatron_puzzle.convert.megatron_layout import canonical_state
    from megatron_puzzle.model import checkpoint

    return canonical_state(checkpoint.load(run / "gkd" / "final"))


def _same_curve(ref, rows, name, tol=1e-5, keys=("loss", "cosine", "kl", "grad_norm")):
    assert [r["step"] for r in rows] == [r["step"] for r in ref], name
    for ra, rb in zip(ref, rows):
        assert ra.keys() == rb.keys(), (name, ra["step"])
        # the on-policy steps' terms too, where the step has them
        for key in [*keys, *({"lm", "unlikelihood", "own_repeats"} & ra.keys())]:
            assert abs(ra[key] - rb[key]) <= tol, (name, ra["step"], key, ra[key], rb[key])


def test_pipeline_and_data_parallel_follow_one_process_and_resume_across_layouts(base_run, tmp_path):
    """On 2 processes, Megatron-Core's engine: PP 2 (uneven 1 + 3 layers, 2 micro-batches) follows the
    single-process loss curve of the same child (every variant kind). A run with the distributed
    optimizer at DP 2, stopped after step 2, resumes at DP 2, at PP 2, at TP 2 and (in this process)
    at DP 1 from its model-space optimizer state; a plain-optimizer run stopped at PP 2 resumes at
    DP 2. All continue the uninterrupted curve for two more steps and end at the same weights."""
    from megatron_puzzle.model import checkpoint

    cfg = GKDConfig(steps=4, save_interval=0, **{**TINY, "eval_tokens": 128, "micro_batch_size": 2})
    one = _copy_run(base_run, tmp_path / "one")
    run_gkd(one, cfg)
    base = cfg.to_dict()
    pp2 = {**base, "pp": 2, "pp_first_stage_layers": 1}
    dp2 = {**base, "batch_size": 2, "micro_batch_size": 1}  # 2 ranks x 2 sequences = the same global batch
    tp2 = {**base, "tp": 2}
    runs = {n: _copy_run(base_run, tmp_path / n) for n in ("pp2", "moved", "dist_dp2")}
    branches = {"dist_to_pp2": pp2, "dist_to_tp2": tp2}
    torchrun(WORKER, 2, "--tp", "1", "--pp", "2", "--run-dir", str(runs["pp2"]), "--config", json.dumps(pp2),
             "--out", str(tmp_path / "w.json"), "--also", json.dumps([
                 {"run_dir": str(runs["moved"]), "config": {**pp2, "save_interval": 2, "shard_optimizer": False},
                  "stop_after": 2, "resume_config": {**dp2, "save_interval": 2, "shard_optimizer": False}},
                 # the distributed optimizer (the default at DP 2), its state saved fully_reshardable
                 {"run_dir": str(runs["dist_dp2"]), "config": {**dp2, "save_interval": 2}, "stop_after": 2,
                  "branches": [{"run_dir": str(tmp_path / n), "config": c} for n, c in branches.items()]}]))
    runs.update({n: tmp_path / n for n in branches})
    runs["dist_to_dp1"] = _copy_run(base_run, tmp_path / "dist_to_dp1")
    shutil.copytree(Path(f"{runs['dist_dp2']}_ckpt_at_stop"), runs["dist_to_dp1"] / "gkd" / "ckpt")
    run_gkd(runs["dist_to_dp1"], cfg)  # DP 1: the resume keeps the distributed optimizer that saved the state
    ref = _log(one)
    assert len(ref) == 4
    for name, run in runs.items():
        _same_curve(ref, _log(run), name, keys=("loss", "cosine", "kl", "grad_norm", "lr"))
    layouts = {n: {k: json.loads((runs[n] / "gkd" / "eval.json").read_text())[k] for k in ("tp", "pp", "dp")}
               for n in runs}
    assert layouts["dist_dp2"] == {"tp": 1, "pp": 1, "dp": 2} and layouts["dist_to_tp2"] == {"tp": 2, "pp": 1, "dp": 1}
    assert layouts["dist_to_pp2"] == {"tp": 1, "pp": 2, "dp": 1} and layouts["dist_to_dp1"] == {"tp": 1, "pp": 1, "dp": 1}
    ref_w = _final_weights(one)
    child_w = canonical_state(checkpoint.load(base_run / "child"))
    assert max((ref_w[k] - child_w[k]).abs().max().item() for k in ref_w) > 1e-4  # training moved the weights
    for name, run in runs.items():
        w = _final_weights(run)
        assert w.keys() == ref_w.keys()
        assert max((w[k] - ref_w[k]).abs().max().item() for k in w) <= 1e-5, name
    # the stopped runs left checkpoints at step 2 (the plain one written at PP 2, read at DP 2)
    for name in ("moved", "dist_dp2"):
        saved = Path(f"{runs[name]}_ckpt_at_stop") / "step_0000002"
        assert (saved / "model").is_dir(), name
        state = json.loads((saved / "trainer.json").read_text())
        assert state["distributed_optimizer"] == (name == "dist_dp2") and state["scheduler"]["num_steps"] == 2
    after = [json.loads((run / "gkd" / "eval.json").read_text())["after"]["kl_div"] for run in runs.values()]
    ref_after = json.loads((one / "gkd" / "eval.json").read_text())["after"]["kl_div"]
    assert max(abs(a - ref_after) for a in after) <= 1e-5
    # a resume that asks for the other optimizer kind is refused, naming the fix
    refused = _copy_run(base_run, tmp_path / "refused")
    shutil.copytree(Path(f"{runs['dist_dp2']}_ckpt_at_stop"), refused / "gkd" / "ckpt")
    with pytest.raises(ValueError, match="distributed optimizer's state; resume with shard_optimizer true"):
        run_gkd(refused, replace(cfg, shard_optimizer=False))


def test_tp2_pp2_on_four_processes_and_resume_at_another_tp_and_pp(base_run, tmp_path):
    """TP 2 x PP 2 (4 processes) follows one process; a run stopped at TP 1 x PP 1 resumes at TP 2 x PP 2
    from its distributed checkpoint (model and optimizer state) and continues the same curve."""
    # steps 2 and 4 are on-policy: the stages generate in turn (KV cache per stage), before and after the resume;
    # the parent writes one row's prompt (drawn on the last stage, seeded by the step: the resume draws alike)
    cfg = GKDConfig(steps=4, save_interval=2, unlikelihood=1.0, on_policy_every=2, on_policy_prefix=8,
                    on_policy_parent_rows=0.25, **{**TINY, "eval_tokens": 128, "micro_batch_size": 2, "shard_optimizer": False,
                       "loss": {"lm": 0.5}})
    one = _copy_run(base_run, tmp_path / "one")

    def stop(step, record):
        if step == 2:
            raise KeyboardInterrupt("simulated kill after step 2")

    with pytest.raises(KeyboardInterrupt):
        run_gkd(one, cfg, on_step=stop)
    moved = tmp_path / "moved"
    shutil.copytree(one, moved)
    run_gkd(one, cfg)
    fresh = _copy_run(base_run, tmp_path / "fresh")
    layout = {**cfg.to_dict(), "tp": 2, "pp": 2}
    torchrun(WORKER, 4, "--tp", "2", "--pp", "2", "--run-dir", str(fresh), "--config", json.dumps(layout),
             "--out", str(tmp_path / "w.json"), "--also", json.dumps([{"run_dir": str(moved), "config": layout}]))
    ref = _log(one)
    keys = ("loss", "cosine", "kl", "grad_norm")
    assert [("own_repeats" in r, "lm" in r) for r in ref] == [(False, True), (True, False)] * 2
    _same_curve(ref, _log(fresh), "tp2 x pp2", keys=keys)
    _same_curve(ref, _log(moved), "resumed at tp2 x pp2", keys=keys)
    ref_w = _final_weights(one)
    for run in (fresh, moved):
        w = _final_weights(run)
        assert max((w[k] - ref_w[k]).abs().max().item() for k in w) <= 1e-5, run.name


def test_bf16_teacher_is_held_in_bf16_and_close_to_fp32(base_run):
    from megatron_puzzle.distill.gkd import teacher_outputs
    from megatron_puzzle.model import checkpoint

    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = GKDConfig(teacher_dtype=dtype, **TINY)
        teacher = checkpoint.load(base_run / "parent", cfg.teacher_runtime())
        # the matrices (all but a few norm vectors, which Megatron-Core's CPU norm keeps in fp32)
        assert {p.dtype for p in teacher.parameters() if p.ndim > 1} == {getattr(torch, dtype)}
        with torch.no_grad():
            out[dtype] = teacher_outputs(teacher, tokens, cfg, hidden=True)
    (lf, hf), (lb, hb) = out["float32"], out["bfloat16"]
    assert lb.dtype == torch.float32 and all(h.dtype == torch.float32 for h in hb)
    # bf16 keeps ~3 significant digits: the KL between the two is tiny next to the logits' spread
    assert losses.vocab_parallel_kl(lf, lb).item() < 1e-3
    assert (lb - lf).abs().max().item() < 0.05 * lf.abs().max().item()
    with pytest.raises(ValueError, match="teacher_dtype"):
        GKDConfig(teacher_dtype="float16")


def _engine(run, cfg):
    """(engine, student, teacher) of RUN/child against RUN/parent, built as run_gkd builds them."""
    from megatron_puzzle.distill.gkd import build_engine
    from megatron_puzzle.model import checkpoint

    teacher = checkpoint.load(run / "parent", cfg.teacher_runtime())
    teacher.requires_grad_(False)
    teacher.eval()
    student = checkpoint.load(run / "child", cfg.runtime())
    student.train()
    return build_engine(student, teacher, cfg), student, teacher


def test_recompute_inside_megatrons_block_gives_the_same_step(base_run):
    """Megatron-Core's full recompute (inside TransformerBlock) through the engine: the same loss,
    gradient norm (the cosine term's gradient included) and updated weights as without it, while
    each student layer really runs twice (forward, then again in the backward)."""
    from megatron_puzzle.distill.gkd import train_step

    batch = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(5))
    result = {}
    for recompute in (False, True):
        cfg = GKDConfig(recompute=recompute, **TINY)
        engine, student, _ = _engine(base_run, cfg)
        calls = [0]
        hooks = [layer.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
                 for layer in student.decoder.layers]
        record = train_step(engine, batch, cfg, lr=1e-3)
        for h in hooks:
            h.remove()
        weights = {n: p.detach().clone() for n, p in student.named_parameters()}
        result[recompute] = record, weights, calls[0]
    (r0, w0, c0), (r1, w1, c1) = result[False], result[True]
    n = len(w0) and 4  # the child's 4 layers
    assert c0 == n and c1 == 2 * n, (c0, c1)
    for key in ("loss", "cosine", "kl", "grad_norm"):
        assert abs(r0[key] - r1[key]) <= 1e-6, (key, r0[key], r1[key])
    assert max((w0[k] - w1[k]).abs().max().item() for k in w0) <= 1e-6


def test_parallel_sizes_the_model_cannot_take_are_refused_before_building(base_run, tmp_path, capsys):
    """One line naming the layer, the size and the valid choices, from the config alone (so every
    rank raises it alike, before any model or process group exists)."""
    from megatron_puzzle.cli import main
    from megatron_puzzle.model import checkpoint
    from megatron_puzzle.model.gpt import LayoutError, check_layout

    child = checkpoint.load_config(base_run / "child")  # 4 heads, KV 2/1/-/-, FFN 96/48/-/-, 4 layers
    with pytest.raises(LayoutError, match=r"TP 3 does not split the model's 4 query heads; valid TP: 1, 2, 4"):
        check_layout(child, tp=3)
    with pytest.raises(LayoutError, match=r"layer 0: TP 4 does not split its FFN size 90; valid TP: 1, 2$"):
        check_layout(child.with_blocks([child.blocks[0].__class__(child.blocks[0].attention,
                                                                  child.blocks[1].ffn.__class__("full", 90))]
                                       + list(child.blocks[1:])), tp=4)
    with pytest.raises(LayoutError, match=r"PP 5 exceeds the model's 4 layers; valid PP: 1..4"):
        check_layout(child, pp=5)
    with pytest.raises(LayoutError, match=r"PP 3 does not split .* 4 layers evenly; valid PP: 1, 2, 4"):
        check_layout(child, pp=3)
    check_layout(child, pp=3, first_stage_layers=2)  # 2 + 1 + 1
    with pytest.raises(LayoutError, match=r"6 processes are not a multiple of TP x PP = 2 x 2 = 4"):
        check_layout(child, tp=2, pp=2, world=6)
    with pytest.raises(LayoutError, match=r"layer 1: FP8 needs each TP shard's FFN size to be a multiple of 16, "
                                          r"got 48 / TP 2 = 24"):
        check_layout(child, tp=2, fp8=True)
    check_layout(child, tp=2, pp=2, world=8)
    # through the command: one line, nothing started
    run = _copy_run(base_run, tmp_path / "run")
    assert main(["gkd", "--run-dir", str(run), "--pp", "5", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "PP 5 exceeds the child's 4 layers" in err, err
    assert not (run / "gkd").exists()


def test_lm_only_gkd_still_evaluates_against_the_parent(base_run, tmp_path):
    """With the cosine and KL terms off the parent is not run in training, but the held-out
    evaluation still compares the child with it."""
    run = _copy_run(base_run, tmp_path / "lm")
    result = run_gkd(run, GKDConfig(steps=2, save_interval=0, **{**TINY, "eval_tokens": 128,
                                                                  "loss": {"cosine": 0, "kl": 0, "lm": 1}}))
    rows = _log(run)
    assert len(rows) == 2 and "kl" not in rows[0] and "cosine" not in rows[0]
    assert abs(rows[0]["loss"] - rows[0]["lm"]) < 1e-12
    assert result["after"]["kl_div"] > 0 and result["after"]["parent_lm_loss"] == result["before"]["parent_lm_loss"]


def test_repeat_mask_and_the_masked_terms_match_float64(mcore):
    """skip_repeats: the positions that continue a 3-gram seen earlier leave the KL and LM means."""
    rows = torch.tensor([[5, 1, 2, 3, 1, 2, 3, 1, 9, 1, 2], [4, 4, 4, 4, 4, 7, 7, 7, 4, 4, 4]])
    # (1,2,3) and (2,3,1) recur at positions 6 and 7; (4,4,4) recurs at 3 and 4, (4,4,4) again at 10
    assert losses.repeat_mask(rows)[0].nonzero().flatten().tolist() == [6, 7]
    assert losses.repeat_mask(rows)[1].nonzero().flatten().tolist() == [3, 4, 10]
    # the sort-based tensor version against the plain per-row scan, on rows full of repeats
    gen = torch.Generator().manual_seed(0)
    for shape, vocab, n in (((3, 64), 3, 3), ((2, 40), 2, 4), ((4, 2), 5, 3), ((1, 30), 50, 2)):
        rand = torch.randint(0, vocab, shape, generator=gen)
        assert losses.repeat_mask(rand, n).tolist() == [losses.repeating(r, n) for r in rand.tolist()]
    t, s, _ = fixed_logits(shape=(2, 11, VOCAB))
    keep = ~losses.repeat_mask(rows)
    v, g = _grad(lambda x: losses.vocab_parallel_kl(t, x, mask=keep), s)
    rv, rg = _grad(lambda x: ref_kl(t[keep], x[keep]), s.double())  # the kept positions alone, float64
    assert abs(v.item() - rv.item()) < 1e-5 and (g.double() - rg).abs().max() < 1e-6
    assert g[~keep].abs().max() == 0  # no gradient from a repeating position
    v, g = _grad(lambda x: losses.vocab_parallel_cross_entropy(x, rows, mask=keep), s)
    rv, rg = _grad(lambda x: ref_ce(x[keep], rows[keep]), s.double())
    assert abs(v.item() - rv.item()) < 1e-5 and (g.double() - rg).abs().max() < 1e-6


def test_skip_repeats_reaches_the_loss(base_run, tmp_path):
    """One GKD step with and without skip_repeats: the same where the batch repeats no 3-gram,
    different where it does (data made of a repeated phrase)."""
    from megatron_puzzle.data import TokenBatches
    from megatron_puzzle.data.shards import load_split

    def first_step(run, skip):
        shutil.rmtree(run / "gkd", ignore_errors=True)
        run_gkd(run, GKDConfig(steps=1, save_interval=0, skip_repeats=skip, loss={"lm": 1.0}, **{**TINY, "eval_tokens": 0}))
        return _log(run)[0]

    def first_targets(run):
        return TokenBatches(run / "data", 32, 4, shuffle=True, targets=True, split="train").batch(0)[:, 1:]

    plain = _copy_run(base_run, tmp_path / "plain")
    assert not losses.repeat_mask(first_targets(plain)).any()  # random tokens: no 3-gram twice in a window
    a, b = first_step(plain, False), first_step(plain, True)
    assert a["kl"] == b["kl"] and a["lm"] == b["lm"]
    looped = _copy_run(base_run, tmp_path / "looped")
    tokens = np.asarray(load_split(looped / "data", "train"))
    np.save(looped / "data" / "train.npy", np.resize(tokens[:7], len(tokens)))  # a 7-token phrase, over and over
    assert losses.repeat_mask(first_targets(looped)).float().mean() > 0.5
    a, b = first_step(looped, False), first_step(looped, True)
    assert a["kl"] != b["kl"] and a["lm"] != b["lm"]


def test_a_stop_request_saves_at_the_step_and_the_rerun_continues_the_curve(base_run, tmp_path):
    """SIGUSR1 (what Slurm sends before the time limit) mid-run: GKD saves at the next step boundary,
    even with no checkpoint interval, stops with Preempted, and the rerun follows the uninterrupted curve."""
    import os
    import signal

    from megatron_puzzle.utils import preempt

    cfg = GKDConfig(steps=4, save_interval=0, **TINY)
    straight = _copy_run(base_run, tmp_path / "straight")
    run_gkd(straight, cfg)

    stopped = _copy_run(base_run, tmp_path / "stopped")

    def signal_after_step_2(step, record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    try:
        with pytest.raises(preempt.Preempted, match="step 2"):
            run_gkd(stopped, cfg, on_step=signal_after_step_2)
    finally:
        preempt.reset()
    assert signal.getsignal(signal.SIGUSR1) is not preempt._handler, "the handlers are restored after the loop"
    assert latest_checkpoint(stopped / "gkd" / "ckpt").name == "step_0000002"
    run_gkd(stopped, cfg)
    a, b = _log(straight), _log(stopped)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6, (ra["step"], ra["loss"], rb["loss"])


def ref_unlikelihood(s, targets, mask, over):
    q = F.softmax(s.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (-torch.log1p(-q) * mask).sum() / over.sum()


def test_unlikelihood_term_matches_float64(mcore):
    """-log(1 - q(target)) summed over the masked positions, over the count of the `over` positions."""
    t, s, targets = fixed_logits(shape=(2, 9, VOCAB))
    s[0, 3] = s[0, 3] + 30.0 * F.one_hot(targets[0, 3], VOCAB)  # q(target) ~ 1: clamped, finite
    gen = torch.Generator().manual_seed(3)
    over = torch.rand(2, 9, generator=gen) < 0.8
    mask = over & (torch.rand(2, 9, generator=gen) < 0.5)
    mask[0, 3] = over[0, 3] = False
    v, g = _grad(lambda x: losses.vocab_parallel_unlikelihood(x, targets, mask, over), s)
    rv, rg = _grad(lambda x: ref_unlikelihood(x, targets, mask, over), s.double())
    assert mask.sum() >= 3 and abs(v.item() - rv.item()) < 1e-5 and (g.double() - rg).abs().max() < 1e-6
    assert g[~mask].abs().max() == 0
    mask[0, 3] = True
    assert torch.isfinite(losses.vocab_parallel_unlikelihood(s, targets, mask, over))


def test_on_policy_step_trains_on_the_childs_own_continuations(base_run, tmp_path):
    """An on-policy step: the child continues each row's prefix greedily, with Megatron-Core's KV cache
    (GPUs, TP, PP) or the DeciLM runtime (CPU at TP 1 / PP 1), the same tokens as a full forward per token
    either way; the step's KL (own tokens that repeat no 3-gram), unlikelihood (own tokens that do) and
    loop share equal float64 sums on those rows."""
    from megatron_puzzle.distill.gkd import RuntimeGenerator, own_continuations, runtime_generation, train_step
    from megatron_puzzle.model import forward

    cfg = GKDConfig(unlikelihood=0.5, on_policy_every=3, on_policy_prefix=6, **TINY)
    assert [cfg.on_policy(s) for s in range(6)] == [False, False, True, False, False, True]
    engine, student, teacher = _engine(base_run, cfg)
    batch = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(2))
    rows = own_continuations(student, batch[:, :6], 33, cfg)
    assert student.training and torch.equal(rows[:, :6], batch[:, :6])
    with torch.no_grad():  # the reference: the whole row through the model for every new token
        ref = batch[:, :6]
        while ref.shape[1] < 33:
            ref = torch.cat([ref, forward.logits(student, ref)[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(rows, ref)
        runtime = RuntimeGenerator(student, torch.float32)
        runtime.refresh(student)
        assert torch.equal(runtime.continuations(batch[:, :6], 33), ref)
        s_logits = forward.logits(student, rows[:, :-1]).double()
        t_logits = forward.logits(teacher, rows[:, :-1]).double()
    targets = rows[:, 1:]
    own = torch.zeros_like(targets, dtype=torch.bool)
    own[:, 5:] = True
    loops = torch.tensor([losses.repeating(r) for r in targets.tolist()]) & own
    assert 0 < loops.sum() < own.sum(), "the tiny child should loop in some of its tokens, not all"
    kl = ref_kl(t_logits[own & ~loops], s_logits[own & ~loops])
    ul = ref_unlikelihood(s_logits, targets, loops, own)
    record = train_step(engine, batch, cfg, lr=1e-3, on_policy=True)
    assert abs(record["own_repeats"] - (loops.sum() / own.sum()).item()) < 1e-6
    assert abs(record["kl"] - kl.item()) < 1e-4 and abs(record["unlikelihood"] - ul.item()) < 1e-4
    assert abs(record["loss"] - (record["cosine"] + record["kl"] + 0.5 * record["unlikelihood"])) < 1e-5
    assert "lm" not in record and record["grad_norm"] > 0
    plain = train_step(engine, batch, cfg, lr=1e-3)
    # generating left the engine intact: DDP's gradient hooks still fill the gradients
    assert "own_repeats" not in plain and "unlikelihood" not in plain and plain["grad_norm"] > 0
    # the step generated through the runtime, whose copy follows the trained weights at every refresh
    assert runtime_generation(cfg) and engine.generator is not None
    engine.generator.refresh(student)
    assert torch.equal(engine.generator.continuations(batch[:, :6], 33), own_continuations(student, batch[:, :6], 33, cfg))
    assert not torch.equal(engine.generator.continuations(batch[:, :6], 33), ref), "two steps changed the child"
    with pytest.raises(ValueError, match="sequence_parallel: false"):
        GKDConfig(unlikelihood=1.0, on_policy_prefix=8, tp=2, sequence_parallel=True, **TINY)
    with pytest.raises(ValueError, match="on_policy_prefix"):
        GKDConfig(unlikelihood=1.0, on_policy_prefix=32, **TINY)


def test_a_resume_tells_changed_settings_from_ones_the_checkpoint_predates():
    """A setting missing from an older checkpoint trained as its default: resuming with the default is
    no change, with another value it is; layout settings may always change."""
    from megatron_puzzle.distill.gkd import changed_settings

    now = GKDConfig(**TINY).to_dict()
    older = {k: v for k, v in now.items() if k != "on_policy_parent_rows"}
    assert changed_settings(older, now) == []
    assert changed_settings(older, {**now, "on_policy_parent_rows": 0.5}) == ["on_policy_parent_rows"]
    assert changed_settings({**now, "lr": 1.0, "tp": 4}, now) == ["lr"]
    assert changed_settings(now, {**now, "loss": {"cosine": 1.0, "kl": 1.0, "lm": 1.0}}) == ["loss"]


def test_nucleus_draws_only_from_the_top_p_set():
    """`next_tokens` with a generator: draws at `PROMPT_SAMPLING` only among the likeliest tokens whose
    probabilities reach its top-p, in proportion to them; without one, the greedy pick."""
    from megatron_puzzle.distill.gkd import PROMPT_SAMPLING, next_tokens

    assert PROMPT_SAMPLING == (1.0, 0.95)
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # nucleus at 0.95: tokens 1, 3, 2 (0.95 reached with 2)
    logits = probs.log().expand(20000, -1)
    draws = next_tokens(logits, torch.Generator().manual_seed(0)).squeeze(1)
    share = torch.bincount(draws, minlength=4).double() / len(draws)
    assert share[0] == 0
    assert torch.allclose(share[1:], torch.tensor([0.5, 0.15, 0.3], dtype=torch.float64) / 0.95, atol=0.015)
    assert torch.equal(next_tokens(logits[:3]), torch.ones(3, 1, dtype=torch.long))
    # other settings (the benchmarks' samplers): at temperature 0.5 the probabilities square before the
    # nucleus (0.25, 0.09, 0.0225, 0.0025 over 0.365), and top-p 0.9 keeps tokens 1 and 3 only
    draws = next_tokens(logits, torch.Generator().manual_seed(1), temperature=0.5, top_p=0.9).squeeze(1)
    share = torch.bincount(draws, minlength=4).double() / len(draws)
    assert share[0] == 0 and share[2] == 0
    assert torch.allclose(share[[1, 3]], torch.tensor([0.25, 0.09], dtype=torch.float64) / 0.34, atol=0.015)


def test_on_policy_step_with_prompts_the_parent_writes(base_run, monkeypatch):
    """With `on_policy_parent_rows`, the batch's last rows continue prompts the parent drew from the
    document-start token: the same prompts from the DeciLM runtime (a CPU) and Megatron-Core's
    inference path (GPUs, TP, PP) for the same step, other prompts at another step."""
    from megatron_puzzle.distill import gkd
    from megatron_puzzle.distill.gkd import own_continuations, parent_prompts, train_step

    cfg = GKDConfig(unlikelihood=0.5, on_policy_every=1, on_policy_prefix=6, on_policy_parent_rows=0.5, **TINY)
    engine, student, teacher = _engine(base_run, cfg)
    engine.prompt_start = 3
    first = parent_prompts(engine, 2, cfg, step=7)
    assert first.shape == (2, 6) and (first[:, 0] == 3).all() and engine.prompter is not None
    assert torch.equal(parent_prompts(engine, 2, cfg, step=7), first)
    assert not torch.equal(parent_prompts(engine, 2, cfg, step=8), first)
    start = torch.full((2, 1), 3, dtype=torch.long)
    sampling = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7 * 1009)
    assert torch.equal(own_continuations(teacher, start, 6, cfg, sampling), first)
    assert len({tuple(r) for r in parent_prompts(engine, 8, cfg, step=1).tolist()}) > 1, "rows draw apart"
    batch = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(2))
    seen, original = [], gkd.RuntimeGenerator.continuations

    def spy(self, prefixes, length, sampling=None):  # the child's greedy continuations: which prompts
        if sampling is None:
            seen.append(prefixes.clone())
        return original(self, prefixes, length, sampling)

    monkeypatch.setattr(gkd.RuntimeGenerator, "continuations", spy)
    record = train_step(engine, batch, cfg, lr=1e-3, on_policy=True, step=7)
    assert len(seen) == 1 and torch.equal(seen[0][:2], batch[:2, :6]) and torch.equal(seen[0][2:], first)
    assert record["grad_norm"] > 0 and "own_repeats" in record
    with pytest.raises(ValueError, match="on_policy_parent_rows"):
        GKDConfig(unlikelihood=1.0, on_policy_prefix=8, on_policy_parent_rows=1.5, **TINY)
