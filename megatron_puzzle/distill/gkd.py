"""Global knowledge distillation (GKD): uptrain the realized child to behave like the whole parent.

Teacher: the parent (RUN/parent), frozen. Student: the child (RUN/child). Loss (the
Puzzle paper's best): the sum over layers of (1 - cosine) between child and parent
hidden states after each block, plus KL(parent || child) on next-token distributions;
the LM loss and every weight are selectable for ablations (`losses.LossWeights`).

Runs on Megatron-Core's tensor-parallel model (vocab-parallel logits, never gathered
for the loss) with data parallelism over the remaining ranks, AdamW with linear
warm-up and cosine decay, global-norm clipping; with `shard_optimizer` each DP rank
keeps AdamW state only for the parameters it owns (ZeRO stage 1). Precision: fp32 on CPU; with
`dtype: bfloat16` the forward runs under autocast (bf16 matmuls) while weights and
AdamW states stay fp32 (they are the master weights); FP8 adds Transformer Engine's
fp8 autocast on Hopper GPUs. `teacher_dtype: bfloat16` holds the frozen parent in bf16.

Outputs (RUN/gkd/):
  ckpt/step_XXXXXXX/   model/ (distributed checkpoint), rank_XXXXX.safetensors (optimizer + RNG
                       per rank), trainer.json (step, tokens, log, eval before), done;
                       removed once final/ is written
  final/               the uptrained child (checkpoint, + tokenizer/ when the child or parent has one)
  eval.json            held-out metrics before and after; log.csv: per-step losses; config.json; done

A killed run restarted with the same command resumes from the newest complete
checkpoint: weights, optimizer, LR schedule (a function of the step), data position
(batch index = step) and RNG, so the loss curve continues as if never stopped.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..model import checkpoint, forward
from ..model.gpt import RuntimeOptions, check_runtime
from ..model.parallel import rank as _rank, world_size as _world
from ..utils.config import from_section
from ..utils.io import DONE_MARKER, atomic_write_json, atomic_write_text, is_done, read_json
from ..model import losses
from . import train_utils

log = logging.getLogger(__name__)

STAGE_DIR = "gkd"
CKPT_DIR = "ckpt"
FINAL_DIR = "final"
TRAINER_STATE = "trainer.json"
_STEP_RE = re.compile(r"^step_(\d{7})$")
# Fields that may change between a killed run and its resume without changing the curve.
_RESUME_FREE = {"save_interval", "progress", "log_every", "keep_checkpoints", "recompute"}


@dataclass
class GKDConfig:
    steps: int = 200  # optimizer steps; `tokens` (if set) overrides: steps = tokens / global batch tokens
    tokens: int | None = None
    batch_size: int = 4  # sequences per data-parallel rank per step
    seq_len: int = 256
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup: int = 10  # steps
    weight_decay: float = 0.01
    clip: float = 1.0  # global gradient-norm limit; 0 disables
    loss: dict = field(default_factory=lambda: {"cosine": 1.0, "kl": 1.0, "lm": 0.0})
    temperature: float = 1.0
    save_interval: int = 50  # steps between checkpoints; 0: only the final model
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (0: keep all)
    eval_tokens: int = 16384  # held-out tokens for the before/after evaluation; 0 skips it
    tp: int = 1
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), float32, bfloat16
    fp8: str | None = None  # None, "hybrid" or "e4m3" (Transformer Engine, Hopper GPUs)
    shard_optimizer: bool = False  # each data-parallel rank keeps AdamW state for ~1/DP of the parameters
    teacher_dtype: str = "float32"  # the frozen parent's parameters: float32 or bfloat16 (half the memory)
    recompute: bool = False  # keep only each layer's input, recompute the layer in the backward (~1/3 more compute)
    seed: int = 1234
    data_seed: int | None = None  # None: the seed recorded with the token shards
    progress: bool = True
    log_every: int = 1  # TensorBoard scalars every N steps

    def __post_init__(self):
        self.loss = {"cosine": 1.0, "kl": 1.0, "lm": 0.0, **(self.loss or {})}
        unknown = set(self.loss) - {"cosine", "kl", "lm"}
        if unknown:
            raise ValueError(f"unknown loss term(s) {sorted(unknown)}; the terms are cosine, kl, lm")
        losses.LossWeights(**self.loss)  # validates
        for name in ("batch_size", "seq_len", "tp"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"gkd {name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "warmup", "save_interval", "eval_tokens", "keep_checkpoints"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"gkd {name} must be >= 0, got {getattr(self, name)}")
        if self.tokens is not None and self.tokens <= 0:
            raise ValueError(f"gkd tokens must be positive, got {self.tokens}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.teacher_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"teacher_dtype must be float32 or bfloat16, got {self.teacher_dtype!r}")
        if self.fp8 not in (None, "hybrid", "e4m3"):
            raise ValueError(f"fp8 must be hybrid or e4m3 (or unset), got {self.fp8!r}")

    @property
    def weights(self) -> losses.LossWeights:
        return losses.LossWeights(**self.loss)

    def total_steps(self, dp: int) -> int:
        if self.tokens is None:
            return self.steps
        return max(1, -(-self.tokens // (self.batch_size * self.seq_len * dp)))

    def compute_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return getattr(torch, self.dtype)

    def runtime(self) -> RuntimeOptions:
        """Model build options: fp32 parameters always (master weights); TE specs when FP8 is asked for."""
        return RuntimeOptions(dtype=torch.float32, use_te=bool(self.fp8), fp8=self.fp8, recompute=self.recompute)

    def teacher_runtime(self) -> RuntimeOptions:
        """The frozen parent needs no master weights: it may hold bf16 parameters."""
        return replace(self.runtime(), dtype=getattr(torch, self.teacher_dtype), recompute=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GKDConfig":
        return from_section(cls, d.get("gkd", d), "gkd")  # a run config.yaml with a `gkd:` section, or flat

    @classmethod
    def from_yaml(cls, path: str | Path) -> "GKDConfig":
        import yaml

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"gkd config {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of gkd settings")
        return cls.from_dict(data)


# --------------------------------------------------------------------------- data

def train_batches(run_dir: Path, cfg: GKDConfig, start_batch: int):
    """Endless training batches [batch, seq_len + 1] for this data-parallel rank, from batch `start_batch`."""
    from ..data import TokenBatches
    from ..model.parallel import dp_rank, dp_size

    return iter(TokenBatches(run_dir / "data", cfg.seq_len, cfg.batch_size, seed=cfg.data_seed, shuffle=True,
                             targets=True, split="train", rank=dp_rank(), world_size=dp_size(),
                             start_batch=start_batch, epochs=None))


def heldout_batches(run_dir: Path, cfg: GKDConfig) -> list[torch.Tensor]:
    """The first `eval_tokens` held-out tokens (in file order), as this rank's batches."""
    from ..data import TokenBatches
    from ..model.parallel import dp_rank, dp_size

    if cfg.eval_tokens == 0:
        return []
    data = TokenBatches(run_dir / "data", cfg.seq_len, cfg.batch_size, shuffle=False, targets=True,
                        split="heldout", rank=dp_rank(), world_size=dp_size(), epochs=1)
    n = min(len(data), max(1, -(-cfg.eval_tokens // (cfg.batch_size * cfg.seq_len * dp_size()))))
    return [data.batch(i) for i in range(n)]


# --------------------------------------------------------------------------- forward helpers

def _autocast(cfg: GKDConfig):
    dtype = cfg.compute_dtype()
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if torch.cuda.is_available() else "cpu", dtype=dtype)


def _fp8(model, cfg: GKDConfig):
    # run_layers calls the layers directly, so the block-level fp8 context of
    # TransformerBlock.forward is not entered: open Megatron-Core's here.
    if not cfg.fp8:
        return contextlib.nullcontext()
    from megatron.core.fp8_utils import get_fp8_context

    return get_fp8_context(model.config)


def model_outputs(model, tokens: torch.Tensor, cfg: GKDConfig, *, hidden: bool, logits: bool = True):
    """(vocab-parallel logits or None, per-layer hidden states or None)."""
    with _autocast(cfg), _fp8(model, cfg):
        h = forward.embed(model, tokens)
        if hidden:
            h, outs = forward.run_layers(model, h, collect=True)
        else:
            h, outs = forward.run_layers(model, h), None
        out = forward.head(model, h) if logits else None
    return out, outs


def teacher_outputs(teacher, tokens: torch.Tensor, cfg: GKDConfig, *, hidden: bool, logits: bool = True):
    """The parent's outputs in fp32 (a bf16 teacher's included), so the loss math is the same either way."""
    out, outs = model_outputs(teacher, tokens, cfg, hidden=hidden, logits=logits)
    if cfg.teacher_dtype == "float32":
        return out, outs
    return (out.float() if out is not None else None), ([h.float() for h in outs] if outs is not None else None)


# --------------------------------------------------------------------------- evaluation

def _all_reduce_dp(values: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
    return values


@torch.no_grad()
def evaluate(student, teacher, batches: list[torch.Tensor], cfg: GKDConfig) -> dict[str, float]:
    """Held-out KL(parent || child), LM loss, top-1 agreement with the parent and next-token accuracy.

    The metrics are the scoring stage's (model.metrics), token-weighted over all batches
    and data-parallel ranks. Also the parent's own LM loss and accuracy, for reference.
    """
    from ..model.metrics import ALL_METRICS, MetricSums, Reference

    was_training = student.training
    student.eval()
    dev = _device()
    child, parent = MetricSums(), MetricSums()
    for batch in batches:
        batch = batch.to(dev)
        tokens, targets = batch[:, :-1], batch[:, 1:]
        s_logits, _ = model_outputs(student, tokens, cfg, hidden=False)
        t_logits, _ = teacher_outputs(teacher, tokens, cfg, hidden=False)
        ref = Reference.from_logits(t_logits.float(), targets)
        child.add(s_logits.float(), ref)
        parent.add(t_logits.float(), ref)
    student.train(was_training)
    sums = torch.tensor([child.tokens, *(child.sums[m] for m in ALL_METRICS), parent.sums["lm_loss"],
                         parent.sums["accuracy"]], dtype=torch.float64, device=dev)
    _all_reduce_dp(sums)
    n = float(sums[0])
    if n == 0:
        return {"tokens": 0}
    m = dict(zip(ALL_METRICS, (float(v) / n for v in sums[1:1 + len(ALL_METRICS)])))
    return {"tokens": int(n), "kl_div": m["kl_div"], "lm_loss": m["lm_loss"], "top1_agreement": m["top1_agreement"],
            "next_token_accuracy": m["accuracy"], "parent_lm_loss": float(sums[-2]) / n,
            "parent_next_token_accuracy": float(sums[-1]) / n}


# --------------------------------------------------------------------------- one step

def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def train_step(student, teacher, optimizer, batch: torch.Tensor, cfg: GKDConfig, lr: float,
               owners: dict[str, int] | None = None) -> dict[str, float]:
    """One optimizer step on this rank's batch [batch, seq_len + 1]; returns the DP-averaged loss terms.

    `owners` (shard_optimizer): this rank's optimizer steps only its own parameters; the
    updated values are then broadcast from each parameter's owner over the DP group.
    """
    weights = cfg.weights
    batch = batch.to(_device())
    tokens, targets = batch[:, :-1], batch[:, 1:]
    t_logits = t_hidden = None
    if weights.cosine or weights.kl:
        with torch.no_grad():
            t_logits, t_hidden = teacher_outputs(teacher, tokens, cfg, hidden=bool(weights.cosine),
                                                 logits=bool(weights.kl))
    s_logits, s_hidden = model_outputs(student, tokens, cfg, hidden=bool(weights.cosine))
    loss, terms = losses.gkd_loss(s_logits, t_logits, s_hidden, t_hidden, targets, weights, cfg.temperature)
    loss.backward()
    train_utils.average_gradients_dp(student)
    grad_norm = train_utils.clip_grad_norm(student, cfg.clip)
    train_utils.set_lr(optimizer, lr)
    optimizer.step()
    if owners is not None:
        train_utils.broadcast_from_owners(student, owners)
    # the model, not the optimizer: a sharded optimizer would leave the others' gradients behind
    student.zero_grad(set_to_none=True)
    names = ["loss", *terms]
    values = torch.tensor([float(loss.detach()), *terms.values()], dtype=torch.float64, device=_device())
    from ..model.parallel import dp_size

    values = _all_reduce_dp(values) / dp_size()
    out = {k: float(v) for k, v in zip(names, values)}
    out.update(lr=lr, grad_norm=grad_norm)
    return out


# --------------------------------------------------------------------------- checkpoints

def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step_{step:07d}"


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """Newest complete checkpoint (with its done marker); half-written ones are ignored."""
    if not ckpt_root.exists():
        return None
    done = [p for p in ckpt_root.iterdir() if _STEP_RE.match(p.name) and is_done(p)]
    return max(done, key=lambda p: int(_STEP_RE.match(p.name).group(1))) if done else None


def save_training_checkpoint(ckpt_root: Path, student, optimizer, state: dict[str, Any]) -> Path:
    """model/ + one optimizer/RNG file per rank + trainer.json, built under a temp name, renamed when complete."""
    from ..model.parallel import barrier

    final = step_dir(ckpt_root, state["step"])
    tmp = final.with_name(f".{final.name}.tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    checkpoint.save(student, tmp / "model", extra={"step": state["step"], "tokens": state["tokens"]})
    train_utils.save_rank_state(tmp / f"rank_{_rank():05d}.safetensors", optimizer)
    barrier()
    if _rank() == 0:
        atomic_write_json(tmp / TRAINER_STATE, state)
        (tmp / DONE_MARKER).write_text("ok\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    barrier()
    return final


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    """Remove all but the newest `keep` complete checkpoints (rank 0)."""
    done = sorted((p for p in ckpt_root.iterdir() if _STEP_RE.match(p.name) and is_done(p)), key=lambda p: p.name)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_training_checkpoint(path: Path, student, optimizer, world: int, tp: int) -> dict[str, Any]:
    state = read_json(path / TRAINER_STATE)
    if state.get("world_size") != world or state.get("tp") != tp:
        raise ValueError(
            f"{path} was written by {state.get('world_size')} processes at TP {state.get('tp')}, "
            f"but this run has {world} at TP {tp}; resume with the same launch (torchrun --nproc-per-node and --tp), "
            "or remove the gkd directory to start over"
        )
    checkpoint.load_into(student, path / "model")
    train_utils.load_rank_state(path / f"rank_{_rank():05d}.safetensors", optimizer)
    return state


# --------------------------------------------------------------------------- the stage

def _write_log_csv(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    keys = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    atomic_write_text(path, buf.getvalue())


def _summary_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: logs stay in log.csv
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _check_inputs(run: Path) -> None:
    for name, what in (("parent", "run `megatron-puzzle import`"), ("child", "run `megatron-puzzle realize`")):
        try:
            checkpoint.check(run / name)
        except (FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(f"gkd needs {run / name}: {e}; {what} first") from None
    if not is_done(run / "data"):
        raise FileNotFoundError(f"gkd needs token shards in {run / 'data'}; run `megatron-puzzle data` first")


def run_gkd(run_dir: str | Path, config: GKDConfig | None = None, *, overwrite: bool = False,
            on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Uptrain RUN/child against RUN/parent; write RUN/gkd. Returns the eval.json content.

    Call on every rank (torchrun) with the same arguments. Resumes from the newest
    complete checkpoint in RUN/gkd/ckpt; a finished stage (RUN/gkd/done) is kept
    unless `overwrite`. `on_step(step, record)` runs after each step (tests use it to
    simulate a crash).
    """
    from ..model.parallel import barrier, dp_rank, dp_size, init_distributed

    cfg = config or GKDConfig()
    opts = cfg.runtime()
    check_runtime(opts)  # FP8 / TE without a GPU fails here, before any work
    run = Path(run_dir)
    out = run / STAGE_DIR
    if is_done(out) and not overwrite:
        log.info("gkd already finished in %s; keeping it (pass overwrite to redo)", out)
        return read_json(out / "eval.json")
    _check_inputs(run)
    init_distributed(cfg.tp, seed=cfg.seed)
    if overwrite and _rank() == 0 and out.exists():
        shutil.rmtree(out)
    barrier()
    torch.manual_seed(cfg.seed)

    teacher = checkpoint.load(run / "parent", cfg.teacher_runtime())
    teacher.requires_grad_(False)
    teacher.eval()
    student = checkpoint.load(run / "child", opts)
    student.train()
    if student.puzzle_config.num_layers != teacher.puzzle_config.num_layers and cfg.weights.cosine:
        raise ValueError(f"child has {student.puzzle_config.num_layers} layers, parent "
                         f"{teacher.puzzle_config.num_layers}: the cosine term needs equal counts; set loss.cosine: 0")
    owners = None
    if cfg.shard_optimizer and dp_size() > 1:
        owners = train_utils.shard_owners(student, dp_size())
    owned = None if owners is None else {n for n, r in owners.items() if r == dp_rank()}
    optimizer = train_utils.build_optimizer(student, lr=cfg.lr, weight_decay=cfg.weight_decay, owned=owned)
    total = cfg.total_steps(dp_size())
    tokens_per_step = cfg.batch_size * cfg.seq_len * dp_size()
    cfg_dict = cfg.to_dict()

    ckpt_root = out / CKPT_DIR
    state: dict[str, Any] = {"step": 0, "tokens": 0, "history": [], "eval_before": None,
                             "world_size": _world(), "tp": cfg.tp, "config": cfg_dict}
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        saved = read_json(latest / TRAINER_STATE)
        changed = sorted(k for k in cfg_dict if k not in _RESUME_FREE and saved["config"].get(k) != cfg_dict[k])
        if changed:
            raise ValueError(f"{latest} was trained with other settings ({', '.join(changed)}); resume with the "
                             f"same config, or rerun with overwrite to start over")
        state = load_training_checkpoint(latest, student, optimizer, _world(), cfg.tp)
        log.info("resuming gkd from %s (step %d)", latest, state["step"])
    if _rank() == 0:
        atomic_write_json(out / "config.json", cfg_dict)

    heldout = heldout_batches(run, cfg)
    if state["eval_before"] is None:
        state["eval_before"] = evaluate(student, teacher, heldout, cfg)
        log.info("held-out before gkd: %s", state["eval_before"])

    writer = _summary_writer(out) if _rank() == 0 else None
    bar = None
    if _rank() == 0 and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=state["step"], desc="gkd", unit="step")
    batches = train_batches(run, cfg, state["step"])
    while state["step"] < total:
        step = state["step"]
        lr = train_utils.lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, total=total)
        t0 = time.perf_counter()
        record = train_step(student, teacher, optimizer, next(batches), cfg, lr, owners)
        dt = time.perf_counter() - t0
        state["step"] = step + 1
        state["tokens"] += tokens_per_step
        record = {"step": step + 1, "tokens": state["tokens"], **record, "tokens_per_s": tokens_per_step / dt}
        state["history"].append(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if writer is not None and (step + 1) % max(1, cfg.log_every) == 0:
            for k, v in record.items():
                if k not in ("step", "tokens"):
                    writer.add_scalar(f"gkd/{k}", v, step + 1)
        if cfg.save_interval and state["step"] % cfg.save_interval == 0 and state["step"] < total:
            save_training_checkpoint(ckpt_root, student, optimizer, state)
            if _rank() == 0:
                prune_checkpoints(ckpt_root, cfg.keep_checkpoints)
                _write_log_csv(out / "log.csv", state["history"])
        if on_step is not None:
            on_step(state["step"], record)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()

    result = {"before": state["eval_before"], "after": evaluate(student, teacher, heldout, cfg),
              "steps": state["step"], "tokens": state["tokens"], "loss_weights": cfg.loss,
              "tp": cfg.tp, "dp": dp_size(), "dtype": str(cfg.compute_dtype()).replace("torch.", ""),
              "fp8": cfg.fp8}
    log.info("held-out after gkd: %s", result["after"])
    checkpoint.save(student, out / FINAL_DIR, extra={"stage": "gkd", "steps": state["step"], "tokens": state["tokens"]})
    if _rank() == 0:
        _copy_tokenizer(run, out / FINAL_DIR)
        _write_log_csv(out / "log.csv", state["history"])
        atomic_write_json(out / "eval.json", result)
        (out / DONE_MARKER).write_text("ok\n")
        # resume checkpoints (weights + AdamW state, ~4x the model) have no use once final/ is
        # written, and the default run would keep ~1 GB of them per trained model
        shutil.rmtree(ckpt_root, ignore_errors=True)
    barrier()
    return result


def _copy_tokenizer(run: Path, dest: Path) -> None:
    for src in (run / "child" / "tokenizer", run / "parent" / "tokenizer"):
        if src.is_dir():
            tmp = dest / ".tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            tmp.rename(dest / "tokenizer")
            return
