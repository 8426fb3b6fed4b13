"""Global knowledge distillation (GKD): uptrain the realized child to behave like the whole parent.

Teacher: the parent (RUN/parent), frozen. Student: the child (RUN/child). Loss (the
Puzzle paper's best): the sum over layers of (1 - cosine) between child and parent
hidden states after each block, plus KL(parent || child) on next-token distributions;
the LM loss and every weight are selectable for ablations (`losses.LossWeights`).

Runs on Megatron-Core's training engine at any TP x PP x DP: student and teacher are
split into pipeline stages and run together in one `get_forward_backward_func` schedule
(`GKDStage`), gradients go through `DistributedDataParallel` and `finalize_model_grads`,
and `get_megatron_optimizer` (the distributed optimizer when DP > 1) clips and steps.
The cosine term is computed on the stage owning each layer, the KL and LM terms on the
last stage from vocab-parallel logits (never gathered). LR: linear warm-up, cosine decay.
Precision: fp32 with local specs on CPU; on a GPU Transformer Engine specs, the forward
under bf16 autocast with fp32 master weights, the teacher in bf16, FP8 (delayed or
current scaling) for the student when asked for.

Outputs (RUN/gkd/):
  ckpt/step_XXXXXXX/   model/ (distributed checkpoint of the weights and the sharded optimizer
                       state), trainer.json (step, tokens, log, eval before, layout), done;
                       removed once final/ is written
  final/               the uptrained child (checkpoint, + tokenizer/ when the child or parent has one)
  eval.json            held-out metrics before and after; log.csv: per-step losses; config.json; done

A killed run restarted with the same command (or at another TP x PP x DP with the same
global batch) resumes from the newest complete checkpoint: weights, optimizer state (model
space: any layout), Megatron-Core's LR scheduler state and data position (batch index =
step), so the loss curve continues as if never stopped (dropout is 0: no RNG state to restore).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import logging
import re
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..model import checkpoint, forward, losses
from ..model.gpt import RuntimeOptions, check_runtime
from ..model.parallel import rank as _rank, world_size as _world
from ..utils import preempt
from ..utils.config import from_section
from ..utils.errors import InputError
from ..utils.io import DONE_MARKER, atomic_write_json, atomic_write_text, is_done, read_json
from . import train_utils

log = logging.getLogger(__name__)

STAGE_DIR = "gkd"
CKPT_DIR = "ckpt"
FINAL_DIR = "final"
TRAINER_STATE = "trainer.json"
_STEP_RE = re.compile(r"^step_(\d{7})$")
# how the parent writes on-policy prompts (`GKDConfig.on_policy_parent_rows`): temperature and nucleus
PROMPT_SAMPLING = (1.0, 0.95)
# the optimizer state's layout in a checkpoint: model space (any TP x PP x DP); older checkpoints
# (no such key) held the distributed optimizer's flat buffers (dp_reshardable: same TP x PP only)
OPTIMIZER_FORMAT = "model_space"
# Fields that may change between a killed run and its resume without changing the curve.
RESUME_FREE = {"save_interval", "progress", "log_every", "keep_checkpoints", "recompute", "tp", "pp",
               "pp_first_stage_layers", "pp_last_stage_layers", "micro_batch_size", "shard_optimizer",
               "optimizer_cpu_offload"}


_DTYPES = ("auto", "fastest", "float32", "bfloat16")


def _resolve_dtype(name: str) -> torch.dtype:
    """auto: bf16 on a GPU, fp32 on a CPU (the reference the CPU tests compare layouts in); fastest: bf16 also
    on a CPU with bf16 units (AVX512-BF16 or AMX: there bf16 GKD trains ~1.6x faster to the same quality,
    docs/report.md), fp32 on other CPUs, where bf16 is emulated and slower."""
    if name in ("auto", "fastest"):
        from ..model.cpu_support import cpu_has_bf16

        fast = torch.cuda.is_available() or (name == "fastest" and cpu_has_bf16())
        return torch.bfloat16 if fast else torch.float32
    return getattr(torch, name)


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
    # KL and LM terms skip positions whose target completes a 3-gram seen earlier in the sequence:
    # there the parent itself continues the loop (docs/report.md, "the child's own text")
    skip_repeats: bool = False
    # on-policy steps against loops: every `on_policy_every`-th step the batch rows keep their first
    # `on_policy_prefix` tokens and the child continues them greedily (Megatron-Core's static KV cache).
    # On those rows the KL term applies where the child's text repeats no earlier 3-gram, and the
    # unlikelihood term -log(1 - q(token)) (Welleck et al. 2019), weighted `unlikelihood`, where it
    # does: the child learns from the parent on its own text and away from entering its loops. 0: off
    unlikelihood: float = 0.0
    on_policy_every: int = 2
    on_policy_prefix: int = 32
    # share of an on-policy batch's rows whose prompt the parent writes (sampled from the document-start
    # token, `PROMPT_SAMPLING`) rather than the train text's first tokens: the child then also learns from
    # the parent on its own continuations of the parent's kind of text, not only of the run's domain
    on_policy_parent_rows: float = 0.0
    save_interval: int = 50  # steps between checkpoints; 0: only the final model
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (0: keep all)
    eval_tokens: int = 16384  # held-out tokens for the before/after evaluation; 0 skips it
    tp: int = 1
    pp: int = 1  # pipeline-parallel stages (student and teacher split alike)
    pp_first_stage_layers: int | None = None  # uneven split: layers on the first / last stage (None: even)
    pp_last_stage_layers: int | None = None
    micro_batch_size: int | None = None  # sequences per micro-batch (None: the whole batch_size; PP wants several)
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fastest (also bf16 on CPUs with bf16 units), float32, bfloat16
    fp8: str | None = None  # None, "hybrid" or "e4m3" (Transformer Engine, Hopper GPUs)
    shard_optimizer: bool | None = None  # Megatron-Core's distributed optimizer (None: on when data-parallel > 1)
    optimizer_cpu_offload: bool = False  # Megatron-Core's optimizer CPU offload (GPU runs)
    teacher_dtype: str = "auto"  # the frozen parent's parameters: auto, fastest, float32, bfloat16 (as dtype)
    fp8_recipe: str = "delayed"  # the student's FP8 scaling: delayed (amax history) or tensorwise (current scaling)
    sequence_parallel: bool = False  # Megatron-Core sequence parallelism with TP > 1 (TE norms: GPU only)
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
        for name in ("batch_size", "seq_len", "tp", "pp"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"gkd {name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "warmup", "save_interval", "eval_tokens", "keep_checkpoints"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"gkd {name} must be >= 0, got {getattr(self, name)}")
        if self.micro_batch_size is not None and (self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size):
            raise ValueError(f"gkd micro_batch_size {self.micro_batch_size} must divide batch_size {self.batch_size}")
        if self.tokens is not None and self.tokens <= 0:
            raise ValueError(f"gkd tokens must be positive, got {self.tokens}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("dtype", "teacher_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} must be one of {', '.join(_DTYPES)}, got {getattr(self, name)!r}")
        if self.fp8_recipe not in ("delayed", "tensorwise"):
            raise ValueError(f"fp8_recipe must be delayed or tensorwise (current scaling), got {self.fp8_recipe!r}")
        if self.sequence_parallel and self.tp < 2:
            raise ValueError("sequence_parallel splits the sequence over tensor-parallel ranks: it needs tp >= 2")
        if self.fp8 not in (None, "hybrid", "e4m3"):
            raise ValueError(f"fp8 must be hybrid or e4m3 (or unset), got {self.fp8!r}")
        if self.unlikelihood < 0:
            raise ValueError(f"gkd unlikelihood must be >= 0, got {self.unlikelihood}")
        if self.on_policy_every < 1:
            raise ValueError(f"gkd on_policy_every must be >= 1, got {self.on_policy_every}")
        if self.unlikelihood and not 0 < self.on_policy_prefix < self.seq_len:
            raise ValueError(f"gkd on_policy_prefix must be in [1, seq_len - 1] = [1, {self.seq_len - 1}], "
                             f"got {self.on_policy_prefix}")
        if not 0.0 <= self.on_policy_parent_rows <= 1.0:
            raise ValueError(f"gkd on_policy_parent_rows is a share of the batch's rows in [0, 1], "
                             f"got {self.on_policy_parent_rows}")
        if self.unlikelihood and self.sequence_parallel:
            raise ValueError("gkd unlikelihood generates one token at a time, which sequence parallelism cannot "
                             "split: set sequence_parallel: false or unlikelihood: 0")

    @property
    def weights(self) -> losses.LossWeights:
        return losses.LossWeights(**self.loss)

    def on_policy(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) trains on the child's own continuations."""
        return bool(self.unlikelihood) and step % self.on_policy_every == self.on_policy_every - 1

    def total_steps(self, dp: int) -> int:
        if self.tokens is None:
            return self.steps
        return max(1, -(-self.tokens // (self.batch_size * self.seq_len * dp)))

    def compute_dtype(self) -> torch.dtype:
        return _resolve_dtype(self.dtype)

    def use_distributed_optimizer(self) -> bool:
        from ..model.parallel import dp_size

        return dp_size() > 1 if self.shard_optimizer is None else bool(self.shard_optimizer)

    def teacher_torch_dtype(self) -> torch.dtype:
        return _resolve_dtype(self.teacher_dtype)

    def runtime(self) -> RuntimeOptions:
        """Student build options: fp32 parameters always (master weights); Transformer Engine specs
        on a GPU (fused attention and norms; FP8 when asked for), Megatron's local specs on CPU."""
        return RuntimeOptions(dtype=torch.float32, use_te=bool(self.fp8) or torch.cuda.is_available(), fp8=self.fp8,
                              fp8_recipe=self.fp8_recipe, sequence_parallel=self.sequence_parallel,
                              recompute=self.recompute,
                              first_stage_layers=self.pp_first_stage_layers, last_stage_layers=self.pp_last_stage_layers)

    def teacher_runtime(self) -> RuntimeOptions:
        """The frozen parent needs no master weights: it may hold bf16 parameters."""
        return replace(self.runtime(), dtype=self.teacher_torch_dtype(), recompute=False, fp8=None)  # FP8: student only

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
    """(vocab-parallel logits or None, per-layer hidden states or None) of a whole model (PP 1),
    outside the training engine: for inspection and the GPU checks."""
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
    if cfg.teacher_torch_dtype() == torch.float32:
        return out, outs
    return (out.float() if out is not None else None), ([h.float() for h in outs] if outs is not None else None)


# --------------------------------------------------------------------------- the engine

def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class _SendWithLoss(torch.autograd.Function):
    """What a non-last pipeline stage sends: its student and teacher hidden states, one tensor
    along the sequence dim (the schedule's p2p carries one tensor). `loss` (the cosine term of
    this stage's layers) joins the backward that the next stage's gradient starts here."""

    @staticmethod
    def forward(ctx, student, teacher, loss, dtype):
        ctx.seq = student.shape[0]
        ctx.dtype = student.dtype
        ctx.has_loss = loss is not None
        # the schedule's buffers are config.pipeline_dtype (bf16 autocast may hand over bf16)
        return torch.cat([student.to(dtype), teacher.to(dtype)], dim=0)

    @staticmethod
    def backward(ctx, grad):
        g_loss = torch.ones((), dtype=torch.float32, device=grad.device) if ctx.has_loss else None
        return grad[:ctx.seq].to(ctx.dtype), None, g_loss, None


class GKDStage(torch.nn.Module):
    """This pipeline stage of the student (trained) and of the teacher (frozen), run together in
    one Megatron-Core schedule. Only the student is a submodule: DDP, the optimizer and
    checkpoints see its parameters alone. Per-layer hidden states come from `LayerOutputs`."""

    def __init__(self, student, teacher, cfg: "GKDConfig"):
        super().__init__()
        self.student = student
        self._teacher = (teacher,)  # a tuple keeps it out of parameters() and state_dict()
        self.config = student.config
        self.model_type = student.model_type
        self.cfg = cfg
        cosine = bool(cfg.weights.cosine)
        self.s_layers = forward.LayerOutputs(student) if cosine else None
        self.t_layers = forward.LayerOutputs(teacher) if cosine else None
        self.needs_teacher = bool(cfg.weights.cosine or cfg.weights.kl)
        self._input: torch.Tensor | None = None
        self.records: list[torch.Tensor] = []  # per micro-batch [cosine, kl, lm] (this stage's share)

    @property
    def teacher(self):
        return self._teacher[0]

    # what finalize_model_grads asks the wrapped model (tied-embedding all-reduce under PP)
    @property
    def pre_process(self):
        return self.student.pre_process

    @property
    def post_process(self):
        return self.student.post_process

    @property
    def share_embeddings_and_output_weights(self):
        return self.student.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.student.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor):
        self._input = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def forward(self, tokens: torch.Tensor):
        s_in = t_in = None
        if self._input is not None:
            s_in, t_in = self._input.chunk(2, dim=0)
            t_in = t_in.detach().to(_teacher_dtype(self.cfg))
        t_out = None
        if self.needs_teacher or not self.training:  # evaluation compares with the parent always
            with torch.no_grad():
                t_out = forward.stage_forward(self.teacher, tokens, t_in, self.t_layers)
        s_out = forward.stage_forward(self.student, tokens, s_in, self.s_layers)
        return s_out, t_out


def _teacher_dtype(cfg: "GKDConfig") -> torch.dtype:
    return cfg.teacher_torch_dtype()


@dataclass
class Engine:
    """Megatron-Core's training engine around one GKD stage: DDP, its optimizer, the schedule."""

    model: Any  # megatron.core.distributed.DistributedDataParallel wrapping a GKDStage
    optimizer: Any  # megatron.core.optimizer.MegatronOptimizer
    stage: GKDStage
    scheduler: Any = None  # megatron.core.optimizer_param_scheduler.OptimizerParamScheduler (run_gkd sets it)
    generator: Any = None  # RuntimeGenerator of on-policy steps on a CPU (built at the first one)
    prompter: Any = None  # RuntimeGenerator of the parent, writing on-policy prompts on a CPU (idem)
    prompt_start: int = 0  # the token a parent-written prompt starts from (RUN/data's document separator)


def build_engine(student, teacher, cfg: "GKDConfig") -> Engine:
    """Wrap built student / teacher stages in Megatron-Core's DDP and optimizer (reusable with fake tensors)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from ..model.parallel import dp_size

    stage = GKDStage(student, teacher, cfg)
    distributed = cfg.use_distributed_optimizer()
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=distributed)
    model = DistributedDataParallel(config=student.config, ddp_config=ddp_config, module=stage)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay, adam_beta1=0.9,
        adam_beta2=0.95, adam_eps=1e-8, clip_grad=cfg.clip, use_distributed_optimizer=distributed,
        params_dtype=torch.float32, bf16=False, fp16=False,
        optimizer_cpu_offload=cfg.optimizer_cpu_offload,
        optimizer_offload_fraction=1.0 if cfg.optimizer_cpu_offload else 0.0,
    )
    optimizer = get_megatron_optimizer(opt_config, [model], use_gloo_process_groups=dp_size() > 1 and not torch.cuda.is_available())
    config = student.config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    config.pipeline_dtype = torch.float32
    return Engine(model, optimizer, stage)


def _forward_step(cfg: "GKDConfig", num_microbatches: int, evaluate: bool, on_policy: bool, data_iterator, model):
    """Megatron-Core's forward_step_func: one micro-batch through this stage of student and teacher."""
    from megatron.core import parallel_state

    stage: GKDStage = model.module if hasattr(model, "module") else model
    batch = next(data_iterator).to(_device())
    tokens, targets = batch[:, :-1], batch[:, 1:]
    with _autocast(cfg):
        s_out, t_out = model(tokens)
    weights = cfg.weights
    cos = None
    if stage.s_layers is not None and stage.s_layers.hidden and not evaluate:
        cos = losses.cosine_term(stage.s_layers.hidden, [h.float() for h in stage.t_layers.hidden],
                                 sequence_parallel=stage.config.sequence_parallel)
    if not parallel_state.is_pipeline_last_stage():
        if t_out is None:
            t_out = torch.zeros_like(s_out)
        if cos is not None:
            stage.records.append(torch.cat([cos.detach().reshape(1), cos.new_zeros(_TRAIN_RECORDS - 1)]))
            cos = weights.cosine * cos / num_microbatches  # the schedule scales the last stage's loss alike
        return _SendWithLoss.apply(s_out, t_out, cos, stage.config.pipeline_dtype), None
    return s_out, functools.partial(_loss, stage, cfg, evaluate, on_policy, targets, t_out, cos)


# per training micro-batch: cosine, KL, LM, unlikelihood, share of the child's own tokens that repeat
_TRAIN_RECORDS = 5


def _loss(stage: GKDStage, cfg: "GKDConfig", evaluate: bool, on_policy: bool, targets, t_logits, cos, s_logits):
    """The last stage's loss: KL and LM terms on vocab-parallel logits (never gathered), plus the
    cosine term of this stage's layers; on an on-policy step KL and unlikelihood on the child's own
    tokens (`GKDConfig.unlikelihood`); in evaluation, the held-out metric sums."""
    if evaluate:
        from ..model.metrics import ALL_METRICS, MetricSums, Reference

        ref = Reference.from_logits(t_logits.float(), targets)
        child, parent = MetricSums(), MetricSums()
        child.add(s_logits.float(), ref)
        parent.add(t_logits.float(), ref)
        stage.records.append(torch.tensor([child.tokens, *(child.sums[m] for m in ALL_METRICS),
                                           parent.sums["lm_loss"], parent.sums["accuracy"]], dtype=torch.float64))
        return s_logits.new_zeros(()), {}
    weights = cfg.weights
    zero = s_logits.new_zeros((), dtype=torch.float32)
    cos = zero if cos is None else cos
    if on_policy:  # the rows are the child's own continuations after `on_policy_prefix` tokens
        own = torch.zeros_like(targets, dtype=torch.bool)
        own[:, cfg.on_policy_prefix - 1:] = True  # targets the child wrote
        loops = losses.repeat_mask(targets) & own
        kl = losses.vocab_parallel_kl(t_logits.float(), s_logits, cfg.temperature, own & ~loops) \
            if weights.kl else zero
        ul = losses.vocab_parallel_unlikelihood(s_logits, targets, loops, own)
        loss = weights.cosine * cos + weights.kl * kl + cfg.unlikelihood * ul
        share = loops.sum().float() / own.sum().clamp_min(1).float()
        stage.records.append(torch.stack([cos.detach(), kl.detach(), zero, ul.detach(), share]))
        return loss, {}
    mask = ~losses.repeat_mask(targets) if cfg.skip_repeats else None
    kl = losses.vocab_parallel_kl(t_logits.float(), s_logits, cfg.temperature, mask) if weights.kl else zero
    lm = losses.vocab_parallel_cross_entropy(s_logits, targets, mask) if weights.lm else zero
    loss = weights.cosine * cos + weights.kl * kl + weights.lm * lm
    stage.records.append(torch.stack([cos.detach(), kl.detach(), lm.detach(), zero, zero]))
    return loss, {}


def _run_schedule(engine: Engine, batch: torch.Tensor, cfg: "GKDConfig", evaluate: bool,
                  on_policy: bool = False) -> torch.Tensor:
    """One global step of this DP rank's batch through Megatron-Core's schedule (any PP, PP 1 too);
    returns this stage's per-micro-batch records summed over micro-batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro = cfg.micro_batch_size or batch.shape[0]
    chunks = list(batch.split(micro, dim=0))
    engine.stage.records = []
    get_forward_backward_func()(
        forward_step_func=functools.partial(_forward_step, cfg, len(chunks), evaluate, on_policy),
        data_iterator=iter(chunks), model=[engine.model], num_microbatches=len(chunks),
        seq_length=2 * (batch.shape[1] - 1), micro_batch_size=chunks[0].shape[0], forward_only=evaluate)
    width = 1 + 4 + 2 if evaluate else _TRAIN_RECORDS
    records = engine.stage.records
    total = torch.stack(records).double().sum(0) if records else torch.zeros(width, dtype=torch.float64)
    return total.to(_device())


def _reduce_over(values: torch.Tensor, *groups) -> torch.Tensor:
    for group in groups:
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(values, group=group)
    return values


@torch.no_grad()
def evaluate(engine: Engine, batches: list[torch.Tensor], cfg: GKDConfig) -> dict[str, float]:
    """Held-out KL(parent || child), LM loss, top-1 agreement with the parent and next-token accuracy.

    The metrics are the scoring stage's (model.metrics), token-weighted over all batches
    and data-parallel ranks, computed on the last pipeline stage. Also the parent's own LM
    loss and accuracy, for reference.
    """
    from megatron.core import parallel_state

    from ..model.metrics import ALL_METRICS

    model = engine.model
    was_training = model.training
    model.eval()
    sums = torch.zeros(7, dtype=torch.float64, device=_device())
    for batch in batches:
        sums += _run_schedule(engine, batch, cfg, evaluate=True)
    model.train(was_training)
    _reduce_over(sums, parallel_state.get_pipeline_model_parallel_group(), parallel_state.get_data_parallel_group())
    n = float(sums[0])
    if n == 0:
        return {"tokens": 0}
    m = dict(zip(ALL_METRICS, (float(v) / n for v in sums[1:1 + len(ALL_METRICS)])))
    return {"tokens": int(n), "kl_div": m["kl_div"], "lm_loss": m["lm_loss"], "top1_agreement": m["top1_agreement"],
            "next_token_accuracy": m["accuracy"], "parent_lm_loss": float(sums[-2]) / n,
            "parent_next_token_accuracy": float(sums[-1]) / n}


def next_tokens(logits: torch.Tensor, sampling: torch.Generator | None = None,
                temperature: float = PROMPT_SAMPLING[0], top_p: float = PROMPT_SAMPLING[1]) -> torch.Tensor:
    """[batch, 1] next tokens from last-position logits [batch, vocab]: the greedy pick, or with
    `sampling` a draw at `temperature` from the smallest set of tokens reaching `top_p` (nucleus
    sampling; by default `PROMPT_SAMPLING`)."""
    if sampling is None:
        return logits.argmax(dim=-1, keepdim=True)
    probs, order = torch.softmax(logits.float() / temperature, dim=-1).sort(dim=-1, descending=True)
    probs = probs * (probs.cumsum(dim=-1) - probs < top_p)
    return order.gather(-1, torch.multinomial(probs, 1, generator=sampling))


@torch.no_grad()
def own_continuations(student, prefixes: torch.Tensor, length: int, cfg: GKDConfig,
                      sampling: torch.Generator | None = None) -> torch.Tensor:
    """Rows [batch, length]: `prefixes` [batch, prefix] continued greedily by the child, one token per
    forward with Megatron-Core's static KV cache (each pipeline stage keeps its own layers' cache).
    Under PP the stages run in turn, each handing its hidden states on (`model.pipe.PipeStage`, Megatron-Core's
    P2P layer, as scoring and BLD do); the last stage's logits are
    gathered over tensor-parallel ranks and its pick goes to every stage, so all ranks of a pipeline
    hold the same rows. On a GPU under the training autocast, FP8 off (`config.fp8` is cleared while it
    runs: Megatron's blocks would open their FP8 context, and one token per row is below FP8's shape
    limits); on a CPU in fp32, since CPU autocast casts every weight again at every token (1.6x
    slower per token there, docs/gkd.md). `sampling`: draw each token from `PROMPT_SAMPLING` with this
    generator instead (the parent writing prompts); tensor-parallel ranks take their first rank's draw."""
    from megatron.core import parallel_state
    from megatron.core.inference.contexts import StaticInferenceContext

    from ..model.pipe import PipeStage

    stage = PipeStage(student)
    b, device = prefixes.shape[0], prefixes.device
    context = StaticInferenceContext(b, length)
    positions = torch.arange(length, device=device).expand(b, -1)
    rows, new = prefixes, prefixes
    was_training, fp8 = student.training, student.config.fp8
    student.eval()  # Megatron-Core's inference path runs only in eval mode
    student.config.fp8 = None
    try:
        with _autocast(cfg) if torch.cuda.is_available() else contextlib.nullcontext():
            while rows.shape[1] < length:
                start, n = context.sequence_len_offset, new.shape[1]
                # each stage waits for the previous one's hidden states, runs its layers, hands them on
                student.set_input_tensor(None if stage.is_first else stage.recv((n, b, student.config.hidden_size)))
                out = student(input_ids=new, position_ids=positions[:, start:start + n], attention_mask=None,
                              inference_context=context, runtime_gather_output=True)
                stage.send(out)
                context.sequence_len_offset += n
                new = next_tokens(out[:, -1], sampling).to(rows.dtype) if stage.is_last else \
                    torch.empty((b, 1), dtype=rows.dtype, device=device)
                if sampling is not None and parallel_state.get_tensor_model_parallel_world_size() > 1:
                    dist.broadcast(new, src=parallel_state.get_tensor_model_parallel_src_rank(),
                                   group=parallel_state.get_tensor_model_parallel_group())
                if stage.size > 1:  # the last stage's pick, to every stage
                    dist.broadcast(new, src=dist.get_process_group_ranks(stage.group())[-1], group=stage.group())
                rows = torch.cat([rows, new], dim=1)
    finally:
        student.config.fp8 = fp8
        student.set_input_tensor(None)
        student.train(was_training)
    return rows


class RuntimeGenerator:
    """The child's greedy continuations on a CPU at TP 1 / PP 1, through the project's DeciLM runtime (the
    code an exported child is served with) in the GKD compute dtype, from a copy of the child's weights
    refreshed before every use. On 2 CPU cores it writes 4 rows of the default child's text at ~30 ms per
    token in bf16 against ~68 ms for Megatron-Core's inference path in fp32 (docs/gkd.md): on a CPU that
    path must run in fp32 (autocast casts every weight again at every token), and putting bf16 copies
    into the parameters' `.data` drops their gradient accumulators, with them Megatron-Core DDP's hooks.
    The copy costs one model of host memory in that dtype, which only a small model on a CPU pays."""

    def __init__(self, student, dtype: torch.dtype):
        from ..cost.decilm_runtime import runtime_model

        self.cfg = student.puzzle_config
        with torch.random.fork_rng():  # its random init must not move the training's random stream
            self.model = runtime_model(self.cfg, dtype=dtype)

    def refresh(self, student) -> None:
        """Copy the child's current weights in (one layer gathered at a time)."""
        from ..convert.megatron_layout import CanonicalView
        from ..cost.decilm_runtime import load_canonical

        load_canonical(self.model, self.cfg, CanonicalView(student))

    @torch.no_grad()
    def continuations(self, prefixes: torch.Tensor, length: int,
                      sampling: torch.Generator | None = None) -> torch.Tensor:
        """Rows [batch, length]: `prefixes` continued greedily (or drawn, `next_tokens`), one token per
        forward on a KV cache."""
        from transformers.cache_utils import DynamicCache

        cache, rows, new = DynamicCache(), prefixes, prefixes
        while rows.shape[1] < length:
            logits = self.model(input_ids=new, cache=cache, use_cache=True, logits_to_keep=1).logits
            new = next_tokens(logits[:, -1], sampling).to(rows.dtype)
            rows = torch.cat([rows, new], dim=1)
        return rows


def runtime_generation(cfg: GKDConfig) -> bool:
    """Whether on-policy rows come from `RuntimeGenerator` (a CPU at TP 1 / PP 1) rather than
    `own_continuations` (GPUs, where the training autocast serves generation too, and any TP or PP)."""
    return not torch.cuda.is_available() and cfg.tp == 1 and cfg.pp == 1


def parent_prompts(engine: Engine, rows: int, cfg: GKDConfig, step: int) -> torch.Tensor:
    """[rows, on_policy_prefix] prompts the parent writes from `engine.prompt_start`, drawn at
    `PROMPT_SAMPLING` from a generator seeded by the run's seed, the step and the data-parallel rank (a
    resumed run draws the same prompts; data-parallel ranks draw different ones)."""
    from ..model.parallel import dp_rank

    device = _device()
    sampling = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step * 1009 + dp_rank())
    start = torch.full((rows, 1), engine.prompt_start, dtype=torch.long, device=device)
    teacher = engine.stage.teacher
    if runtime_generation(cfg):
        if engine.prompter is None:  # the parent is frozen: one copy serves every step
            engine.prompter = RuntimeGenerator(teacher, cfg.compute_dtype())
            engine.prompter.refresh(teacher)
        return engine.prompter.continuations(start, cfg.on_policy_prefix, sampling)
    return own_continuations(teacher, start, cfg.on_policy_prefix, cfg, sampling)


def train_step(engine: Engine, batch: torch.Tensor, cfg: GKDConfig, lr: float | None = None,
               on_policy: bool = False, step: int = 0) -> dict[str, float]:
    """One optimizer step on this rank's batch [batch, seq_len + 1]: Megatron-Core's schedule runs
    forward and backward of every micro-batch, `finalize_model_grads` reduces the gradients,
    its optimizer clips and steps. The LR is the one the scheduler set (or `lr` when given).
    `on_policy`: the rows are first replaced by the child's own continuations of their first
    `cfg.on_policy_prefix` tokens (`GKDConfig.unlikelihood`), the last `on_policy_parent_rows` of them
    of prompts the parent writes (`parent_prompts`, seeded by `step`).
    Returns the loss terms averaged over data-parallel ranks."""
    from megatron.core import parallel_state
    from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

    from ..model.parallel import dp_size

    engine.model.zero_grad_buffer()
    engine.optimizer.zero_grad()
    if lr is not None:
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
    lr = get_canonical_lr_for_logging(engine.optimizer.param_groups)
    if on_policy:
        prefixes = batch[:, :cfg.on_policy_prefix].to(_device())
        written = round(cfg.on_policy_parent_rows * prefixes.shape[0])
        if written:
            prefixes = torch.cat([prefixes[:prefixes.shape[0] - written],
                                  parent_prompts(engine, written, cfg, step).to(prefixes.dtype)])
        if runtime_generation(cfg):
            if engine.generator is None:
                engine.generator = RuntimeGenerator(engine.stage.student, cfg.compute_dtype())
            engine.generator.refresh(engine.stage.student)
            batch = engine.generator.continuations(prefixes, batch.shape[1])
        else:
            batch = own_continuations(engine.stage.student, prefixes, batch.shape[1], cfg)
    terms = _run_schedule(engine, batch, cfg, evaluate=False, on_policy=on_policy)
    micro = cfg.micro_batch_size or batch.shape[0]
    terms = terms / (-(-batch.shape[0] // micro))
    _reduce_over(terms, parallel_state.get_pipeline_model_parallel_group(), parallel_state.get_data_parallel_group())
    terms = terms / dp_size()
    ok, grad_norm, _ = engine.optimizer.step()
    if not ok:
        raise FloatingPointError("the optimizer skipped a step (inf/nan gradients)")
    w = cfg.weights
    values = dict(zip(("cosine", "kl", "lm", "unlikelihood", "own_repeats"), (float(v) for v in terms)))
    out = {"loss": w.cosine * values["cosine"] + w.kl * values["kl"] + w.lm * values["lm"]
           + cfg.unlikelihood * values["unlikelihood"]}
    out.update({k: values[k] for k in ("cosine", "kl", "lm") if getattr(w, k) and not (on_policy and k == "lm")})
    if on_policy:  # own_repeats: share of the child's own tokens that repeat a 3-gram (its loops, as it trains)
        out.update(unlikelihood=values["unlikelihood"], own_repeats=values["own_repeats"])
    out.update(lr=lr, grad_norm=float(grad_norm))
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


def save_training_checkpoint(ckpt_root: Path, engine: Engine, state: dict[str, Any]) -> Path:
    """model/ (Megatron-Core distributed checkpoint of the student and its sharded optimizer
    state) + trainer.json, built under a temp name and renamed when complete."""
    from ..model.parallel import barrier

    final = step_dir(ckpt_root, state["step"])
    tmp = final.with_name(f".{final.name}.tmp")
    state = {**state, "scheduler": engine.scheduler.state_dict() if engine.scheduler is not None else None,
             "distributed_optimizer": train_utils.is_distributed(engine.optimizer),
             "optimizer_format": OPTIMIZER_FORMAT}
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    student = engine.stage.student
    opt_sd = train_utils.sharded_optimizer_state(engine.optimizer, student.sharded_state_dict(), is_loading=False)
    checkpoint.save(student, tmp / "model", extra={"step": state["step"], "tokens": state["tokens"]},
                    extra_state={"optimizer": opt_sd})
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


def load_training_checkpoint(path: Path, engine: Engine) -> dict[str, Any]:
    """Weights, optimizer state and LR schedule saved at any TP x PP x DP layout, into this layout's
    engine (the optimizer of the kind that saved them: `saved_optimizer_kind`)."""
    state = read_json(path / TRAINER_STATE)
    student = engine.stage.student
    train_utils.init_optimizer_state(engine.optimizer)
    with torch.no_grad():  # fp32 main params are views of the trained parameters
        opt_sd = train_utils.sharded_optimizer_state(engine.optimizer, student.sharded_state_dict(), is_loading=True,
                                                     layout_free=state.get("optimizer_format") == OPTIMIZER_FORMAT)
        extras = checkpoint.load_into(student, path / "model", extra_state={"optimizer": opt_sd})
    train_utils.load_optimizer_state(engine.optimizer, extras["optimizer"], state["step"])
    if engine.scheduler is not None:
        if state.get("scheduler"):
            engine.scheduler.load_state_dict(state["scheduler"])
        else:  # a checkpoint from before the scheduler was saved: its position is the step
            engine.scheduler.step(state["step"])
    return state


def saved_optimizer_kind(path: Path) -> bool | None:
    """Whether the checkpoint at `path` holds the distributed optimizer's state (None: unknown, an
    older checkpoint). Its state loads into an optimizer of the same kind, at any layout."""
    return read_json(path / TRAINER_STATE).get("distributed_optimizer")


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


def _check_layout(run: Path, cfg: GKDConfig) -> None:
    """TP / PP / world size against the parent's and the child's layers, before any model is built."""
    from ..model.gpt import check_layout, launch_world

    world = launch_world()
    for name in ("child", "parent"):
        check_layout(checkpoint.load_config(run / name), tp=cfg.tp, pp=cfg.pp, world=world, fp8=bool(cfg.fp8),
                     first_stage_layers=cfg.pp_first_stage_layers, last_stage_layers=cfg.pp_last_stage_layers,
                     what=name)


def _resume_optimizer_kind(latest: Path, cfg: GKDConfig) -> GKDConfig:
    """A resume keeps the optimizer kind that saved the checkpoint (its state loads at any layout):
    the distributed optimizer's state goes on in a distributed optimizer, at DP 1 too."""
    saved = saved_optimizer_kind(latest)
    if saved is None:
        return cfg
    if cfg.shard_optimizer is None:
        return replace(cfg, shard_optimizer=saved)
    if bool(cfg.shard_optimizer) != saved:
        have = "the distributed optimizer's" if saved else "the plain optimizer's"
        raise InputError(f"{latest} holds {have} state; resume with shard_optimizer {str(saved).lower()} (or unset), "
                         f"or rerun with overwrite to start over")
    return cfg


def changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """GKD settings a resume would change (`RESUME_FREE` may change). A setting the checkpoint does not
    record came after it was written, and it trained as that setting's default does."""
    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(GKDConfig)}
    return sorted(k for k in now if k not in RESUME_FREE and saved.get(k, defaults.get(k)) != now[k])


def run_gkd(run_dir: str | Path, config: GKDConfig | None = None, *, overwrite: bool = False,
            on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Uptrain RUN/child against RUN/parent; write RUN/gkd. Returns the eval.json content.

    Call on every rank (torchrun) with the same arguments. Resumes from the newest
    complete checkpoint in RUN/gkd/ckpt; a finished stage (RUN/gkd/done) is kept
    unless `overwrite`. `on_step(step, record)` runs after each step (tests use it to
    simulate a crash).
    """
    from ..model.parallel import barrier, dp_size, init_distributed

    cfg = config or GKDConfig()
    opts = cfg.runtime()
    check_runtime(opts)  # FP8 / TE without a GPU fails here, before any work
    run = Path(run_dir)
    out = run / STAGE_DIR
    if is_done(out) and not overwrite:
        log.info("gkd already finished in %s; keeping it (pass overwrite to redo)", out)
        return read_json(out / "eval.json")
    _check_inputs(run)
    _check_layout(run, cfg)
    init_distributed(cfg.tp, seed=cfg.seed, pipeline_parallel=cfg.pp)
    if overwrite and _rank() == 0 and out.exists():
        shutil.rmtree(out)
    barrier()
    torch.manual_seed(cfg.seed)

    latest = latest_checkpoint(out / CKPT_DIR)
    if latest is not None:
        cfg = _resume_optimizer_kind(latest, cfg)
    teacher = checkpoint.load(run / "parent", cfg.teacher_runtime())
    teacher.requires_grad_(False)
    teacher.eval()
    student = checkpoint.load(run / "child", opts)
    student.train()
    if student.puzzle_config.num_layers != teacher.puzzle_config.num_layers and cfg.weights.cosine:
        raise ValueError(f"child has {student.puzzle_config.num_layers} layers, parent "
                         f"{teacher.puzzle_config.num_layers}: the cosine term needs equal counts; set loss.cosine: 0")
    engine = build_engine(student, teacher, cfg)
    if cfg.unlikelihood and cfg.on_policy_parent_rows:  # parent-written prompts start as a document does
        from ..data.shards import read_meta

        eos = read_meta(run / "data").get("eos_id")
        if eos is None:
            raise InputError(f"{run / 'data'} records no document-start (eos_id) token for the parent's prompts; "
                             f"rebuild it with `megatron-puzzle data`, or set gkd.on_policy_parent_rows: 0")
        engine.prompt_start = int(eos)
    total = cfg.total_steps(dp_size())
    engine.scheduler = train_utils.lr_scheduler(engine.optimizer, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup,
                                                total=total, weight_decay=cfg.weight_decay)
    tokens_per_step = cfg.batch_size * cfg.seq_len * dp_size()
    cfg_dict = cfg.to_dict()
    cfg_dict_global = {**cfg_dict, "batch_size": cfg.batch_size * dp_size()}  # what a resume must keep

    ckpt_root = out / CKPT_DIR
    state: dict[str, Any] = {"step": 0, "tokens": 0, "history": [], "eval_before": None,
                             "world_size": _world(), "tp": cfg.tp, "pp": cfg.pp, "dp": dp_size(),
                             "config": cfg_dict_global}
    if latest is not None:
        saved = read_json(latest / TRAINER_STATE)
        changed = changed_settings(saved["config"], cfg_dict_global)
        if changed:
            raise InputError(f"{latest} was trained with other settings ({', '.join(changed)}); resume with the "
                             f"same config (any TP x PP x DP with the same global batch), or rerun with overwrite "
                             f"to start over")
        state = load_training_checkpoint(latest, engine)
        state.update(world_size=_world(), tp=cfg.tp, pp=cfg.pp, dp=dp_size(), config=cfg_dict_global)
        log.info("resuming gkd from %s (step %d)", latest, state["step"])
    if _rank() == 0:
        atomic_write_json(out / "config.json", cfg_dict)

    heldout = heldout_batches(run, cfg)
    if state["eval_before"] is None:
        state["eval_before"] = evaluate(engine, heldout, cfg)
        log.info("held-out before gkd: %s", state["eval_before"])

    writer = _summary_writer(out) if _rank() == 0 else None
    bar = None
    if _rank() == 0 and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=state["step"], desc="gkd", unit="step")
    batches = train_batches(run, cfg, state["step"])
    # SIGUSR1/SIGTERM (or $PUZZLE_PREEMPT_FILE) now ask for a checkpoint and a clean stop at a step boundary
    with preempt.watching():
        while state["step"] < total:
            step = state["step"]
            t0 = time.perf_counter()
            if preempt.requested():  # once per step, the same answer on every rank: save, then stop together
                save_training_checkpoint(ckpt_root, engine, state)
                if _rank() == 0:
                    _write_log_csv(out / "log.csv", state["history"])
                raise preempt.Preempted(f"gkd stopped at step {step} on request; the same command resumes it")
            engine.scheduler.step(1)  # the LR of step s + 1: warm-up starts above 0
            record = train_step(engine, next(batches), cfg, on_policy=cfg.on_policy(step), step=step)
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
                save_training_checkpoint(ckpt_root, engine, state)
                if _rank() == 0:
                    prune_checkpoints(ckpt_root, cfg.keep_checkpoints)
                    _write_log_csv(out / "log.csv", state["history"])
            if on_step is not None:
                on_step(state["step"], record)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()

    result = {"before": state["eval_before"], "after": evaluate(engine, heldout, cfg),
              "steps": state["step"], "tokens": state["tokens"], "loss_weights": cfg.loss,
              "tp": cfg.tp, "pp": cfg.pp, "dp": dp_size(), "dtype": str(cfg.compute_dtype()).replace("torch.", ""),
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
