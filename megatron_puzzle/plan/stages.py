"""One step of each stage on one rank, built from the project's own modules, under a memory tracker.

Every function here runs inside `fake.fake_world` (fake tensors, fake process group) and returns the
rank's peak bytes split into weights, gradients, optimizer state and activations:

- import / realize: the model's weights on this rank, plus one full-size tensor in flight (the
  largest tensor of the checkpoint, read whole before it is split over TP); realize also holds one
  layer of library entries it assembles from;
- bld: the parent's layers of this rank (frozen) run forward to one layer, whose input and output
  are kept; that layer's library entries (every trained variant of the layer at once, each a
  standalone Megatron-Core layer with fp32 weights and AdamW state) train on it for two steps;
- score: the parent forward with one block replaced, reference and candidate logits at once;
- gkd: Megatron-Core's DistributedDataParallel (fp32 main grads) + get_megatron_optimizer (bf16 params,
  fp32 master copies; the distributed optimizer with `shard_optimizer`) + its pipeline schedule, two
  iterations (the first of one micro-batch makes the Adam moments, the second runs as many micro-batches
  as can be in flight at once); the student is trained and the teacher frozen, both holding this stage's
  layers; the loss is the per-layer cosine on this stage's hidden states plus KL on vocab-parallel logits.

The student and the child are planned at the parent's shape: the search can only shrink them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import ModelConfig
from .fake import Breakdown, Tracker, megatron_main_grads, megatron_optimizer_tensors

STAGES = ("import", "bld", "score", "realize", "gkd")


@dataclass
class Layout:
    world_size: int
    tensor_parallel: int
    pipeline_parallel: int = 1

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel)


@dataclass
class StageSettings:
    """What one stage's step looks like: batch shape, precision, memory-saving options."""

    micro_batch_size: int = 1  # sequences per forward
    seq_len: int = 4096
    num_microbatches: int = 1  # per optimizer step (gkd)
    dtype: torch.dtype = torch.bfloat16  # parameters of frozen models and of the trained model
    teacher_dtype: torch.dtype = torch.bfloat16
    recompute: bool = False
    distributed_optimizer: bool = False
    variants: tuple = ()  # bld: the layer's trained entries, (BlockConfig, trained subblocks) each


def _pp_position():
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()


def _build(cfg: ModelConfig, dtype: torch.dtype, recompute: bool = False):
    from ..model.gpt import RuntimeOptions, build_model

    pre, post = _pp_position()
    return build_model(cfg, RuntimeOptions(dtype=dtype, recompute=recompute), pre_process=pre, post_process=post)


def _tokens(s: StageSettings, cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (s.micro_batch_size, s.seq_len))


def _hidden(s: StageSettings, cfg: ModelConfig, dtype: torch.dtype) -> torch.Tensor:
    """A stage's input from the previous pipeline stage [seq, batch, hidden]."""
    return torch.empty(s.seq_len, s.micro_batch_size, cfg.hidden_size, dtype=dtype)


def _stage_input(model, s, cfg, tokens, dtype):
    from ..model import forward

    pre, _ = _pp_position()
    return forward.embed(model, tokens) if pre else _hidden(s, cfg, dtype)


# --------------------------------------------------------------------------- import, realize

def _largest_full_tensor(cfg: ModelConfig) -> tuple[int, ...]:
    """The largest tensor of a checkpoint, whole: the embedding/output matrix or one FFN projection."""
    emb = (cfg.vocab_size, cfg.hidden_size)
    ffn = (cfg.intermediate_size, cfg.hidden_size)
    return max(emb, ffn, key=lambda shape: shape[0] * shape[1])


def prepare_import(cfg: ModelConfig, s: StageSettings, tracker: Tracker):
    from megatron.core import parallel_state

    model = _build(cfg, s.dtype)
    tracker.weights(model)
    rows, cols = _largest_full_tensor(cfg)
    tp = parallel_state.get_tensor_model_parallel_world_size()

    def run():
        in_flight = torch.empty((rows // tp, cols), dtype=s.dtype)  # only this rank's rows are read (get_slice)
        del in_flight

    return run, (model,)


def prepare_realize(cfg: ModelConfig, s: StageSettings, tracker: Tracker):
    from ..model.gpt import RuntimeOptions, build_layer

    model = _build(cfg, s.dtype)
    entry = build_layer(cfg, cfg.parent_block(), opts=RuntimeOptions(dtype=s.dtype))  # one layer's entries
    tracker.weights(model, entry)

    def run():
        in_flight = torch.empty(_largest_full_tensor(cfg), dtype=s.dtype)
        del in_flight

    return run, (model, entry)


# --------------------------------------------------------------------------- score

def prepare_score(cfg: ModelConfig, s: StageSettings, tracker: Tracker):
    from ..model import losses
    from ..model import forward
    from ..model.gpt import RuntimeOptions, build_layer

    parent = _build(cfg, s.dtype)
    parent.eval()
    candidate = build_layer(cfg, cfg.parent_block(), opts=RuntimeOptions(dtype=s.dtype))  # the largest variant
    _, post = _pp_position()
    tracker.weights(parent, candidate)

    @torch.no_grad()
    def run():
        tokens = _tokens(s, cfg)
        h = _stage_input(parent, s, cfg, tokens, s.dtype)
        rope = forward.rotary(parent, s.seq_len)
        n = len(parent.decoder.layers)
        ref = forward.run_layers(parent, h, rope=rope)
        # the replaced model reruns from the replaced layer (the first: the longest rerun)
        out = forward.run_layers(parent, h, rope=rope, layers={0: candidate}) if n else h
        if post:
            ref_logits = forward.head(parent, ref).float()
            logits = forward.head(parent, out).float()
            losses.vocab_parallel_kl(ref_logits, logits)

    return run, (parent, candidate)


# --------------------------------------------------------------------------- bld

_OWN = {"attention": ("input_layernorm.", "self_attention."), "ffn": ("pre_mlp_layernorm.", "mlp.")}  # as bld.Entry

def prepare_bld(cfg: ModelConfig, s: StageSettings, tracker: Tracker):
    """The rank's parent layers up to one layer; that layer's entries trained for two steps on its input and output."""
    from ..distill.bld import nmse
    from ..model import forward
    from ..model.gpt import RuntimeOptions, build_layer

    parent = _build(cfg, s.dtype)
    parent.requires_grad_(False)
    entries, params = [], []
    for block, subblocks in s.variants:
        entry = build_layer(cfg, block, opts=RuntimeOptions(dtype=torch.float32))
        own = tuple(p for sub in subblocks for p in _OWN[sub])
        for name, p in entry.named_parameters():  # the parent's subblock beside the variant stays frozen
            p.requires_grad_(name.startswith(own))
            if p.requires_grad:
                params.append(p)
        entries.append(entry)
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False, fused=False) if params else None
    tracker.weights(parent, *entries)

    def run():
        for _ in range(2):  # AdamW moments exist from the first step on
            tokens = _tokens(s, cfg)
            with torch.no_grad():
                h = _stage_input(parent, s, cfg, tokens, s.dtype)
                rope = forward.rotary(parent, s.seq_len)
                layer_in = forward.run_layers(parent, h, rope=rope)  # up to the layer being trained (the last: longest)
                layer_out = forward.run_layers(parent, layer_in, len(parent.decoder.layers) - 1, rope=rope) \
                    if len(parent.decoder.layers) else layer_in
                del h
            x = layer_in.float()
            target = layer_out.float()
            for e in entries:
                out, _ = e(x, attention_mask=None, rotary_pos_emb=rope)
                nmse(out, target).backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            del layer_in, layer_out, x, target

    return run, (parent, entries, opt)


# --------------------------------------------------------------------------- gkd

def prepare_gkd(cfg: ModelConfig, s: StageSettings, tracker: Tracker):
    """Two iterations of Megatron-Core's engine on the student, the frozen teacher beside it."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from ..model import losses
    from ..model import forward

    pre, post = _pp_position()
    teacher = _build(cfg, s.teacher_dtype)
    teacher.requires_grad_(False)
    teacher.eval()
    student = _build(cfg, s.dtype, recompute=s.recompute)
    tcfg = student.config
    ddp = DistributedDataParallel(
        config=tcfg,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=s.distributed_optimizer),
        module=student)
    tcfg.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, weight_decay=0.01, bf16=s.dtype == torch.bfloat16,
                        params_dtype=s.dtype, use_distributed_optimizer=s.distributed_optimizer, clip_grad=1.0),
        [ddp], use_gloo_process_groups=False)

    def step(data_iterator, model):
        tokens = next(data_iterator)
        with torch.no_grad():
            t_in = _stage_input(teacher, s, cfg, tokens, s.teacher_dtype)
            t_out, t_hidden = forward.run_layers(teacher, t_in, collect=True)
            t_logits = forward.head(teacher, t_out) if post else None
            del t_in, t_out
        h = forward.embed(student, tokens) if pre else student.decoder.input_tensor
        out, hidden = forward.run_layers(student, h, collect=True)
        cosine = losses.cosine_term(hidden, t_hidden) if hidden else out.new_zeros(())
        del hidden, t_hidden
        if not post:  # the stage's cosine term rides on the output's backward
            return MoEAuxLossAutoScaler.apply(out, cosine), lambda o: (o.sum() * 0, {})
        loss = cosine + losses.vocab_parallel_kl(t_logits, forward.head(student, out))
        return loss, lambda o: (o, {"loss": o})

    tracker.weights(teacher, student)
    tracker.gradients(megatron_main_grads(ddp))
    tracker.optimizer_state(megatron_optimizer_tensors(optimizer))
    schedule = get_forward_backward_func()

    # Adam moments exist only after a first step, which one micro-batch makes. In the second, micro-batches past
    # those that can be in flight at once (PP + 1 in 1F1B, 2 without PP) repeat the same pattern of memory.
    in_flight = min(s.num_microbatches, parallel_state.get_pipeline_model_parallel_world_size() + 1)

    def run():
        for n in (1, in_flight):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            data = iter([_tokens(s, cfg) for _ in range(n)])
            schedule(forward_step_func=step, data_iterator=data, model=[ddp], num_microbatches=n,
                     seq_length=s.seq_len, micro_batch_size=s.micro_batch_size, forward_only=False)
            optimizer.step()
            tracker.optimizer_state(megatron_optimizer_tensors(optimizer))

    return run, (teacher, ddp, optimizer)


PREPARE = {"import": prepare_import, "bld": prepare_bld, "score": prepare_score, "realize": prepare_realize,
           "gkd": prepare_gkd}


def plan_stage(stage: str, cfg: ModelConfig, s: StageSettings) -> Breakdown:
    """One step of `stage` on this rank under the memory tracker (call inside `fake.fake_world`)."""
    tracker = Tracker()
    run, held = PREPARE[stage](cfg, s, tracker)  # held: what the stage keeps alive through its step
    with tracker:
        run()
    del held
    return tracker.peak()
