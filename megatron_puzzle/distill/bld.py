"""Blockwise local distillation (BLD): train every (layer, variant) of the search space.

Decoupled BLD trains each attention variant inside its layer with the parent's FFN
frozen (input: the parent's layer input h_in[i]), and each FFN variant alone on the
parent's post-attention hidden states h_mid[i] (the parent attention, frozen, would
give exactly those). Coupled pairs train both subblocks together from h_in[i]. The
target is always the parent block's output h_in[i + 1]; the loss is the normalised
MSE, MSE(child, parent) / MSE(parent, 0).

Per step, one parent forward (`parent_activations`) feeds every variant of every
layer this rank owns; the activations live for that batch only. Variants are
dealt round-robin over data-parallel ranks; every rank reads the same batches and
each variant's random init is seeded by (seed, layer, name), so the library does not
depend on the number of ranks. Tensor parallelism shards the parent and every
variant layer alike (Megatron-Core layers).

Resumable: every `checkpoint_every` steps each unfinished variant saves its weights,
optimizer state and counters atomically; a rerun skips finished entries, resumes
partial ones, and refuses entries built with other settings (by name).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..arch import AttentionVariant, BlockConfig, ModelConfig, variant_from_name
from ..convert.megatron_layout import block_canonical, load_block
from ..library import Library, LibraryError, entry_name, expected_shapes, write_entry, write_non_block, write_space
from ..library.store import entry_dir
from ..model import parallel
from ..model.gpt import build_layer
from ..utils.config import from_section
from ..utils.io import DONE_MARKER, atomic_path, atomic_write_text
from ..init.variants import InitConfig, init_pair, init_variant, method_for
from ..model.activations import ParentActivations, parent_activations

log = logging.getLogger(__name__)
PARTIAL_DIR = ".partial"


@dataclass
class BLDConfig:
    steps: int = 100  # optimizer steps (= batches) per trainable variant
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eval_batches: int = 2  # held-out batches for the init / final normalised MSE
    checkpoint_every: int = 25  # steps between partial checkpoints
    seed: int = 0
    tensor_parallel: int = 1
    coupled_pairs: list[str] = field(default_factory=list)  # e.g. ["attn_kv1+ffn_768"], trained at every layer
    progress: bool = True

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "tensor_parallel"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (0 if name == "steps" else 1):
                raise ValueError(f"bld.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.eval_batches < 1:
            raise ValueError(f"bld.eval_batches must be >= 1, got {self.eval_batches}")
        for pair in self.coupled_pairs:
            parts = pair.split("+")
            if len(parts) != 2 or not parts[0].startswith("attn_") or not parts[1].startswith("ffn_"):
                raise ValueError(f"bld.coupled_pairs: {pair!r} is not an attention+FFN pair like attn_kv1+ffn_768")
            for p in parts:
                variant_from_name(p)

    @classmethod
    def from_dict(cls, d: dict | None) -> "BLDConfig":
        return from_section(cls, d, "bld")

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self, init: InitConfig) -> dict:
        """What a library entry depends on; a done entry with another fingerprint is refused."""
        keep = ("steps", "batch_size", "seq_len", "lr", "weight_decay", "betas", "eval_batches", "seed")
        d = {k: getattr(self, k) for k in keep}
        d["betas"] = list(d["betas"])
        d["init"] = init.to_dict()
        return d


def fingerprint_hash(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


class Interrupted(RuntimeError):
    """Raised by the test hooks that simulate a killed run."""


# --------------------------------------------------------------------------- units of work


@dataclass
class Unit:
    """One library entry being built: a variant (or pair) at one layer, as a standalone layer."""

    layer: int
    name: str
    kind: str  # "attention", "ffn" or "pair"
    block: BlockConfig  # of the standalone layer that trains it
    method: str
    trainable: bool
    module: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    tokens: int = 0
    init_loss: float | None = None
    wall_s: float = 0.0

    @property
    def subblocks(self) -> tuple[str, ...]:
        return ("attention", "ffn") if self.kind == "pair" else (self.kind,)

    def params(self):
        prefixes = {"attention": ("input_layernorm.", "self_attention."), "ffn": ("pre_mlp_layernorm.", "mlp.")}
        own = tuple(p for s in self.subblocks for p in prefixes[s])
        return [(n, p) for n, p in self.module.named_parameters() if n.startswith(own)]


def units_of_space(cfg: ModelConfig, space: Sequence[Sequence[str]], pairs: Sequence[Sequence[str]],
                   init: InitConfig) -> list[Unit]:
    """Every entry of the library, in a fixed order (layer, then space order, then pairs)."""
    units = []
    for i, names in enumerate(space):
        for name in names:
            v = variant_from_name(name)
            method = method_for(cfg, v, init)
            if isinstance(v, AttentionVariant):
                block, kind = BlockConfig(v, cfg.parent_block().ffn), "attention"
            else:
                block, kind = BlockConfig(AttentionVariant("no_op"), v), "ffn"
            units.append(Unit(i, name, kind, block, method, method not in ("parent", "no_op")))
        for name in pairs[i] if i < len(pairs) else ():
            a, f = name.split("+")
            block = BlockConfig(variant_from_name(a), variant_from_name(f))
            methods = "+".join(method_for(cfg, variant_from_name(p), init) for p in (a, f))
            units.append(Unit(i, name, "pair", block, methods, True))
    return units


def pairs_of_space(space: Sequence[Sequence[str]], coupled: Sequence[str]) -> list[list[str]]:
    """The coupled pairs trained at each layer: those whose two variants are in that layer's space."""
    return [[p for p in coupled if all(part in names for part in p.split("+"))] for names in space]


def nmse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE(child, parent) / MSE(parent, 0)."""
    return (out - target).pow(2).mean() / target.pow(2).mean()


# --------------------------------------------------------------------------- partial checkpoints


def _partial_path(root: Path, u: Unit) -> Path:
    return root / PARTIAL_DIR / f"layer_{u.layer:03d}" / u.name / f"tp{parallel.tp_rank()}.pt"


def save_partial(root: Path, u: Unit, fp_hash: str) -> None:
    state = {
        "params": {n: p.detach().clone() for n, p in u.params()},
        "optimizer": u.optimizer.state_dict(),
        "meta": {"step": u.step, "tokens": u.tokens, "init_loss": u.init_loss, "wall_s": u.wall_s,
                 "settings": fp_hash, "tp_size": parallel.tp_size()},
    }
    with atomic_path(_partial_path(root, u)) as tmp:
        torch.save(state, tmp)


def load_partial(root: Path, u: Unit, fp_hash: str) -> bool:
    """Resume `u` from its partial checkpoint if there is one; True when resumed."""
    path = _partial_path(root, u)
    if not path.exists():
        return False
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:
        raise LibraryError(f"partial checkpoint of {entry_name(u.layer, u.name)} ({path}) is corrupt ({e}); "
                           "delete it to restart that variant") from None
    meta = state["meta"]
    if meta["settings"] != fp_hash or meta["tp_size"] != parallel.tp_size():
        raise LibraryError(f"partial checkpoint of {entry_name(u.layer, u.name)} was made with other settings "
                           f"(or TP {meta['tp_size']}); rerun with the same config, or delete {path.parent}")
    params = dict(u.params())
    with torch.no_grad():
        for n, t in state["params"].items():
            params[n].copy_(t)
    u.optimizer.load_state_dict(state["optimizer"])
    u.step, u.tokens, u.init_loss, u.wall_s = meta["step"], meta["tokens"], meta["init_loss"], meta["wall_s"]
    return True


# --------------------------------------------------------------------------- the run


@dataclass
class BLDReport:
    steps_run: int = 0
    tokens: int = 0  # parent tokens processed in training steps
    variant_tokens: int = 0  # sum over trained variants of tokens they saw
    parent_forward_s: float = 0.0
    variant_s: float = 0.0
    wall_s: float = 0.0
    train_s: float = 0.0  # the training loop alone (no init/final evaluation, no layer building)
    entries_written: int = 0

    def throughput(self) -> dict:
        t = max(self.train_s or self.wall_s, 1e-9)
        return {"tokens_per_s": self.tokens / t, "variant_tokens_per_s": self.variant_tokens / t,
                "parent_forward_share": self.parent_forward_s / t}


def _rank_world() -> tuple[int, int]:
    return parallel.dp_rank(), parallel.dp_size()


def _build_unit(u: Unit, cfg: ModelConfig, parent: dict[str, torch.Tensor], init_tensors: dict[str, torch.Tensor],
                bld: BLDConfig) -> None:
    u.module = build_layer(cfg, u.block, layer_number=u.layer + 1)
    tensors = dict(init_tensors)
    if u.kind == "attention":  # the parent's FFN, frozen
        for k in expected_shapes(cfg, u.layer, cfg.parent_block().ffn.name):
            tensors[k] = parent[k]
    load_block(u.module, cfg, u.layer, u.block, tensors, subblocks=("attention", "ffn") if u.kind != "ffn" else ("ffn",))
    own = {id(p) for _, p in u.params()}
    for p in u.module.parameters():
        p.requires_grad_(u.trainable and id(p) in own)
    if u.trainable:
        u.optimizer = torch.optim.AdamW([p for _, p in u.params()], lr=bld.lr, betas=bld.betas,
                                        weight_decay=bld.weight_decay)


def _unit_io(u: Unit, acts: ParentActivations):
    return acts.block_io(u.layer, "ffn" if u.kind == "ffn" else "attention")


@torch.no_grad()
def _evaluate(units: list[Unit], parent_model, eval_tokens: list[torch.Tensor], report: BLDReport) -> dict[int, float]:
    """Normalised MSE of each unit over all eval batches: sum of squared errors / sum of squared targets."""
    err = {id(u): 0.0 for u in units}
    ref = {id(u): 0.0 for u in units}
    for tokens in eval_tokens:
        t0 = time.perf_counter()
        acts = parent_activations(parent_model, tokens)
        report.parent_forward_s += time.perf_counter() - t0
        for u in units:
            x, y = _unit_io(u, acts)
            out, _ = u.module(x, attention_mask=None, rotary_pos_emb=acts.rope)
            err[id(u)] += (out - y).double().pow(2).sum().item()
            ref[id(u)] += y.double().pow(2).sum().item()
    return {id(u): err[id(u)] / ref[id(u)] for u in units}


def _entry_tensors(u: Unit, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    want = expected_shapes(cfg, u.layer, u.name)
    got = block_canonical(u.module, cfg, u.layer, u.block)  # collective over TP
    return {k: got[k].contiguous() for k in want}


def _check_done_entry(lib_root: Path, u: Unit, fp_hash: str) -> bool:
    """True if `u` is finished with the same settings; raises (by name) if finished with others."""
    path = entry_dir(lib_root, u.layer, u.name)
    if not (path / DONE_MARKER).exists():
        return False
    try:
        stats = json.loads((path / "stats.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LibraryError(f"library entry {entry_name(u.layer, u.name)} is corrupt ({e}); delete it and rerun") from None
    if stats.get("settings") != fp_hash:
        raise LibraryError(f"library entry {entry_name(u.layer, u.name)} was built with other BLD/init settings; "
                           f"delete {path} (or the whole library) to rebuild it, or rerun with its config")
    return True


def run_bld(parent_model, parent_tensors: dict[str, torch.Tensor], library_dir: str | Path,
            space: Sequence[Sequence[str]], bld: BLDConfig, init: InitConfig,
            train_batch: Callable[[int], torch.Tensor], eval_tokens: list[torch.Tensor],
            init_source: Library | Callable | None = None, *,
            stop_after_steps: int | None = None, stop_after_entries: int | None = None) -> BLDReport:
    """Build (or finish) the block library in `library_dir`.

    `parent_model`: the parent GPTModel (built at the current TP size); `parent_tensors`:
    its canonical tensors. `train_batch(step)` gives the tokens [batch, seq] of a step (the
    same on every rank); `eval_tokens` the held-out batches for the init/final loss.
    `init_source`: the init directory (a `Library`) or a function (layer, name) -> tensors;
    None computes the training-free init without calibration statistics (truncation /
    up-down) — pass calibrated init via `init_source` for the configured methods.
    `stop_after_*` simulate a killed run (tests).
    """
    t_start = time.perf_counter()
    cfg: ModelConfig = parent_model.puzzle_config
    root = Path(library_dir)
    fp = bld.fingerprint(init)
    fp_hash = fingerprint_hash(fp)
    pairs = pairs_of_space(space, bld.coupled_pairs)
    report = BLDReport()
    world_rank = dist.get_rank() if dist.is_initialized() else 0
    if world_rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        write_space(root, [list(n) for n in space], pairs, cfg, {"bld": bld.to_dict(), "init": init.to_dict(),
                                                                  "settings": fp_hash})
        write_non_block(root, cfg, parent_tensors)
    parallel.barrier()

    all_units = units_of_space(cfg, space, pairs, init)
    pending = [u for u in all_units if not _check_done_entry(root, u, fp_hash)]
    parallel.barrier()  # every rank has looked before any rank writes
    dp_rank, dp_size = _rank_world()
    mine = [u for k, u in enumerate(pending) if k % dp_size == dp_rank]
    log.info("BLD: %d entries, %d finished, %d on this rank (dp %d of %d)",
             len(all_units), len(all_units) - len(pending), len(mine), dp_rank, dp_size)

    def initial(u: Unit) -> dict[str, torch.Tensor]:
        if isinstance(init_source, Library):
            if u.kind == "pair":
                a, f = u.name.split("+")
                return {**init_source.load(u.layer, a), **init_source.load(u.layer, f)}
            return init_source.load(u.layer, u.name)
        if callable(init_source):
            return init_source(u.layer, u.name)
        if u.kind == "pair":
            return init_pair(cfg, parent_tensors, u.layer, u.name, init, None, bld.seed)[0]
        return init_variant(cfg, parent_tensors, u.layer, u.name, init, None, bld.seed)[0]

    written = 0

    def finish(u: Unit, final_loss: float) -> None:
        nonlocal written
        tensors = _entry_tensors(u, cfg) if u.module is not None else {}
        if parallel.tp_rank() == 0:
            write_entry(root, u.layer, u.name, tensors, {
                "init": u.method, "init_loss": u.init_loss, "final_loss": final_loss, "tokens": u.tokens,
                "steps": u.step, "wall_s": round(u.wall_s, 3), "kind": u.kind, "settings": fp_hash})
            shutil.rmtree(root / PARTIAL_DIR / f"layer_{u.layer:03d}" / u.name, ignore_errors=True)
        written += 1
        report.entries_written += 1
        if stop_after_entries is not None and written >= stop_after_entries:
            raise Interrupted(f"stopped after {written} entries (test hook)")

    for u in mine:
        _build_unit(u, cfg, parent_tensors, initial(u), bld)
        if u.trainable:
            load_partial(root, u, fp_hash)

    # init loss of every unit that has not been evaluated yet (fresh ones)
    fresh = [u for u in mine if u.init_loss is None]
    if fresh:
        t0 = time.perf_counter()
        losses = _evaluate(fresh, parent_model, eval_tokens, report)
        for u in fresh:
            u.init_loss = losses[id(u)]
            u.wall_s += (time.perf_counter() - t0) / len(fresh)
    # variants that are not trained (parent and no-op) are final now
    for u in [u for u in mine if not u.trainable]:
        finish(u, u.init_loss)
        u.module = None
    training = [u for u in mine if u.trainable]

    start = min((u.step for u in training), default=bld.steps)
    tokens_per_step = bld.batch_size * bld.seq_len
    bar = tqdm(range(start, bld.steps), desc=f"BLD rank {dp_rank}", disable=not bld.progress or world_rank != 0)
    t_loop = time.perf_counter()
    for step in bar:
        active = [u for u in training if u.step == step]
        if not active:
            continue
        t0 = time.perf_counter()
        acts = parent_activations(parent_model, train_batch(step))
        report.parent_forward_s += time.perf_counter() - t0
        for u in active:
            t1 = time.perf_counter()
            x, y = _unit_io(u, acts)
            out, _ = u.module(x, attention_mask=None, rotary_pos_emb=acts.rope)
            loss = nmse(out, y)
            u.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            u.optimizer.step()
            u.step += 1
            u.tokens += tokens_per_step
            u.wall_s += time.perf_counter() - t1
            report.variant_s += time.perf_counter() - t1
            report.variant_tokens += tokens_per_step
        report.steps_run += 1
        report.tokens += tokens_per_step
        if (step + 1) % bld.checkpoint_every == 0 and step + 1 < bld.steps:
            for u in training:
                save_partial(root, u, fp_hash)
        if stop_after_steps is not None and report.steps_run >= stop_after_steps:
            raise Interrupted(f"stopped after {report.steps_run} steps (test hook)")

    report.train_s = time.perf_counter() - t_loop
    if training:
        finals = _evaluate(training, parent_model, eval_tokens, report)
        for u in training:
            finish(u, finals[id(u)])
    parallel.barrier()
    if world_rank == 0:
        lib = Library(root)
        missing = [entry_name(i, n) for i, n in lib.entries() if not lib.has(i, n)]
        if missing:
            raise LibraryError(f"BLD finished but entries are missing: {missing[:5]}")
        atomic_write_text(root / DONE_MARKER, "ok\n")
        shutil.rmtree(root / PARTIAL_DIR, ignore_errors=True)
    report.wall_s = time.perf_counter() - t_start
    return report
