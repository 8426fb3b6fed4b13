"""Blockwise local distillation (BLD): train every entry (layer, variant) of the search space.

Decoupled BLD trains each attention variant inside its layer beside the parent's FFN
(the parent's own module object, frozen; input: the parent's layer input h_in[i]),
and each FFN variant alone on the parent's post-attention hidden states h_mid[i]
(the parent attention, frozen, would give exactly those). Coupled pairs train both
subblocks together from h_in[i]. The target is always the parent block's output
h_in[i + 1]; the loss is the normalised MSE, MSE(child, parent) / MSE(parent, 0).

Per step, one parent forward (`stream_parent`) feeds every entry in training: each
layer's states are handed to that layer's entries as the forward reaches it and
dropped after, so no list of every layer's inputs is kept. Entries are scheduled by
cost, largest first, each to the data-parallel group with the least work so far;
every group reads the same batches and each entry's random init is seeded by
(seed, layer, name), so the library does not depend on the number of ranks. A group
trains its entries in passes of `layers_per_pass` layers (0: all at once): only a
pass's entries and optimizer states are alive, and its parent forward stops at the
pass's last layer, so memory does not grow with the parent's depth (the parent's
early layers are rerun once per pass instead). Tensor parallelism shards the parent
and every entry's layer alike (Megatron-Core layers).

Pipeline parallelism splits the parent over stages (`model.pipe.PipeStage`): each stage
streams the parent through its own layers (input from the previous stage, output sent
to the next) and trains the entries of its layers, dealt over the data-parallel groups
of that stage. The stages of one model replica run the same parent forwards in the same
order: each pass k of every stage runs together (a stage with fewer passes joins with
none), and a pass's steps and evaluations run on every stage if any stage needs them.

Resumable: every `checkpoint_every` steps each unfinished entry saves its weights,
optimizer state and counters atomically; a rerun skips finished entries, resumes
partial ones, and refuses entries built with other settings (by name). Groups never
wait for each other in a collective while one still trains: a finished group polls
the library for the other groups' finished entries.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..arch import AttentionVariant, BlockConfig, ModelConfig, variant_from_name
from ..arch.shapes import non_block_shapes
from ..convert.megatron_layout import block_canonical, load_block
from ..library import Library, LibraryError, entry_name, expected_shapes, write_entry, write_non_block, write_space
from ..library.store import entry_dir
from ..model import parallel
from ..model.gpt import RuntimeOptions, build_layer
from ..utils.config import from_section
from ..utils.io import DONE_MARKER, atomic_path, atomic_write_text
from ..init.variants import InitConfig, init_pair, init_variant, method_for
from ..model.activations import LayerActivations, stream_parent
from ..model.pipe import PipeStage

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
    pipeline_parallel: int = 1  # the parent split over this many stages (world = TP x PP x DP)
    pp_first_stage_layers: int | None = None  # uneven split: layers on the first / last stage (None: even)
    pp_last_stage_layers: int | None = None
    layers_per_pass: int = 0  # layers whose entries train at once (0: all); bounds memory at any depth
    dtype: str = "auto"  # the parent's parameters and the compute: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16
    coupled_pairs: list[str] = field(default_factory=list)  # e.g. ["attn_kv1+ffn_768"], trained at every layer
    progress: bool = True

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "tensor_parallel", "pipeline_parallel"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (0 if name == "steps" else 1):
                raise ValueError(f"bld.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.layers_per_pass, int) or self.layers_per_pass < 0:
            raise ValueError(f"bld.layers_per_pass must be 0 (all layers at once) or a positive integer, "
                             f"got {self.layers_per_pass!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"bld.dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
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

    def torch_dtype(self) -> torch.dtype:
        """The parent's parameter dtype; entries keep fp32 weights and run under autocast to it."""
        if self.dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return getattr(torch, self.dtype)

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


# --------------------------------------------------------------------------- entries


@dataclass
class Entry:
    """One library entry being built: a variant (or pair) at one layer, as a standalone layer."""

    layer: int
    name: str
    kind: str  # "attention", "ffn" or "pair"
    block: BlockConfig  # of the standalone layer that trains it
    method: str
    trainable: bool
    cost: int = 0  # parameters its training step runs through (the scheduler's weight)
    module: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    tokens: int = 0
    init_loss: float | None = None
    wall_s: float = 0.0

    @property
    def subblocks(self) -> tuple[str, ...]:
        return ("attention", "ffn") if self.kind == "pair" else (self.kind,)

    @property
    def input_subblock(self) -> str:
        return "ffn" if self.kind == "ffn" else "attention"

    def params(self):
        prefixes = {"attention": ("input_layernorm.", "self_attention."), "ffn": ("pre_mlp_layernorm.", "mlp.")}
        own = tuple(p for s in self.subblocks for p in prefixes[s])
        return [(n, p) for n, p in self.module.named_parameters() if n.startswith(own)]


def _numel(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def entries_of_space(cfg: ModelConfig, space: Sequence[Sequence[str]], pairs: Sequence[Sequence[str]],
                     init: InitConfig) -> list[Entry]:
    """Every entry of the library, in a fixed order (layer, then space order, then pairs)."""
    entries = []
    parent_ffn = _numel(expected_shapes(cfg, 0, cfg.parent_block().ffn.name))
    for i, names in enumerate(space):
        for name in names:
            v = variant_from_name(name)
            method = method_for(cfg, v, init)
            trainable = method not in ("parent", "no_op")
            own = _numel(expected_shapes(cfg, i, name))
            if isinstance(v, AttentionVariant):  # trains through the parent's FFN beside it
                block, kind, cost = BlockConfig(v, cfg.parent_block().ffn), "attention", own + parent_ffn
            else:
                block, kind, cost = BlockConfig(AttentionVariant("no_op"), v), "ffn", own
            entries.append(Entry(i, name, kind, block, method, trainable, cost if trainable else 0))
        for name in pairs[i] if i < len(pairs) else ():
            a, f = name.split("+")
            block = BlockConfig(variant_from_name(a), variant_from_name(f))
            methods = "+".join(method_for(cfg, variant_from_name(p), init) for p in (a, f))
            entries.append(Entry(i, name, "pair", block, methods, True, _numel(expected_shapes(cfg, i, name))))
    return entries


def schedule(entries: Sequence[Entry], groups: int) -> list[list[Entry]]:
    """Deal entries over `groups` by cost: largest first, each to the group with the least cost so far
    (ties: the lower group). Each group's list comes back in (layer, original) order."""
    load = [0] * groups
    dealt: list[list[int]] = [[] for _ in range(groups)]
    order = sorted(range(len(entries)), key=lambda k: (-entries[k].cost, k))
    for k in order:
        g = min(range(groups), key=lambda j: (load[j], j))
        dealt[g].append(k)
        load[g] += entries[k].cost
    return [[entries[k] for k in sorted(ks)] for ks in dealt]


def passes(entries: Sequence[Entry], layers_per_pass: int) -> list[list[Entry]]:
    """Split a group's entries into passes of `layers_per_pass` consecutive layers it holds (0: one pass)."""
    layers = sorted({e.layer for e in entries})
    if not layers:
        return []
    k = layers_per_pass or len(layers)
    chunks = [set(layers[j : j + k]) for j in range(0, len(layers), k)]
    return [[e for e in entries if e.layer in c] for c in chunks]


def pairs_of_space(space: Sequence[Sequence[str]], coupled: Sequence[str]) -> list[list[str]]:
    """The coupled pairs trained at each layer: those whose two variants are in that layer's space."""
    return [[p for p in coupled if all(part in names for part in p.split("+"))] for names in space]


def nmse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE(child, parent) / MSE(parent, 0), reduced in fp32 (bf16 sums of squares lose the small errors)."""
    out, target = out.float(), target.float()
    return (out - target).pow(2).mean() / target.pow(2).mean()


# --------------------------------------------------------------------------- partial checkpoints


def _partial_path(root: Path, e: Entry) -> Path:
    return root / PARTIAL_DIR / f"layer_{e.layer:03d}" / e.name / f"tp{parallel.tp_rank()}.pt"


def save_partial(root: Path, e: Entry, fp_hash: str) -> None:
    state = {
        "params": {n: p.detach().cpu().clone() for n, p in e.params()},
        "optimizer": e.optimizer.state_dict(),
        "meta": {"step": e.step, "tokens": e.tokens, "init_loss": e.init_loss, "wall_s": e.wall_s,
                 "settings": fp_hash, "tp_size": parallel.tp_size()},
    }
    with atomic_path(_partial_path(root, e)) as tmp:
        torch.save(state, tmp)


def load_partial(root: Path, e: Entry, fp_hash: str) -> bool:
    """Resume `e` from its partial checkpoint if there is one; True when resumed."""
    path = _partial_path(root, e)
    if not path.exists():
        return False
    try:
        state = torch.load(path, weights_only=True, map_location=parallel.device())
    except Exception as err:
        raise LibraryError(f"partial checkpoint of {entry_name(e.layer, e.name)} ({path}) is corrupt ({err}); "
                           "delete it to restart that variant") from None
    meta = state["meta"]
    if meta["settings"] != fp_hash or meta["tp_size"] != parallel.tp_size():
        raise LibraryError(f"partial checkpoint of {entry_name(e.layer, e.name)} was made with other settings "
                           f"(or TP {meta['tp_size']}); rerun with the same config, or delete {path.parent}")
    params = dict(e.params())
    with torch.no_grad():
        for n, t in state["params"].items():
            params[n].copy_(t)
    e.optimizer.load_state_dict(state["optimizer"])
    e.step, e.tokens, e.init_loss, e.wall_s = meta["step"], meta["tokens"], meta["init_loss"], meta["wall_s"]
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
    passes: int = 0

    def throughput(self) -> dict:
        t = max(self.train_s or self.wall_s, 1e-9)
        return {"tokens_per_s": self.tokens / t, "variant_tokens_per_s": self.variant_tokens / t,
                "parent_forward_share": self.parent_forward_s / t}


def _build_entry(e: Entry, cfg: ModelConfig, parent_model, init_tensors: dict[str, torch.Tensor],
                 bld: BLDConfig, stage: PipeStage) -> None:
    # fp32 weights (the optimizer's master copy); with a bf16 parent the entry runs under autocast
    # (`_autocast`), so its inputs and the shared parent FFN stay bf16
    e.module = build_layer(cfg, e.block, layer_number=e.layer + 1, opts=RuntimeOptions(dtype=torch.float32))
    if e.kind == "attention":
        # the parent's FFN module itself, frozen, not a copy (the layer's own FFN is dropped here)
        parent_layer = parent_model.decoder.layers[stage.local(e.layer)]
        e.module.pre_mlp_layernorm = parent_layer.pre_mlp_layernorm
        e.module.mlp = parent_layer.mlp
    load_block(e.module, cfg, e.layer, e.block, init_tensors, subblocks=e.subblocks)
    own = {id(p) for _, p in e.params()}
    for p in e.module.parameters():
        if id(p) in own:
            p.requires_grad_(e.trainable)
    if e.trainable:
        e.optimizer = torch.optim.AdamW([p for _, p in e.params()], lr=bld.lr, betas=bld.betas,
                                        weight_decay=bld.weight_decay)


def _parent_layers(parent_model, tokens: torch.Tensor, end: int, report: BLDReport, stage: PipeStage):
    """`stream_parent`, with the time spent in the parent's forward added to the report."""
    it = stream_parent(parent_model, tokens.to(parallel.device()), end, stage)
    while True:
        t0 = time.perf_counter()
        try:
            acts = next(it)
        except StopIteration:
            return
        finally:
            report.parent_forward_s += time.perf_counter() - t0
        yield acts


def _autocast(parent_model):
    """Autocast to the parent's dtype when it is not fp32 (bf16 on GPU): the parent's bf16 weights and
    the entries' fp32 master weights then meet in one compute dtype."""
    dtype = next(parent_model.parameters()).dtype  # the whole parent (any pipeline stage of it) is in one dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=parallel.device().type, dtype=dtype)


def _by_layer(entries: Sequence[Entry]) -> dict[int, list[Entry]]:
    out: dict[int, list[Entry]] = {}
    for e in entries:
        out.setdefault(e.layer, []).append(e)
    return out


def _run_entry(e: Entry, acts: LayerActivations):
    x, y = acts.io(e.input_subblock)
    out, _ = e.module(x, attention_mask=None, rotary_pos_emb=acts.rope)
    return out, y


@torch.no_grad()
def _evaluate(entries: list[Entry], parent_model, eval_tokens: list[torch.Tensor], report: BLDReport,
              stage: PipeStage) -> dict[int, float]:
    """Normalised MSE of each entry over all eval batches: sum of squared errors / sum of squared targets.
    The sums stay on the device (one scalar per entry) and are read once at the end. Under pipeline
    parallelism every stage calls it together (those with no entries pass the parent's states on)."""
    err = {id(e): torch.zeros((), dtype=torch.float64, device=parallel.device()) for e in entries}
    ref = {id(e): torch.zeros((), dtype=torch.float64, device=parallel.device()) for e in entries}
    layers = _by_layer(entries)
    with _autocast(parent_model):
        for tokens in eval_tokens:
            for acts in _parent_layers(parent_model, tokens, _end(layers, stage), report, stage):
                for e in layers.get(acts.layer, ()):
                    out, y = _run_entry(e, acts)
                    err[id(e)] += (out - y).double().pow(2).sum()
                    ref[id(e)] += y.double().pow(2).sum()
    return {id(e): (err[id(e)] / ref[id(e)]).item() for e in entries}


def _end(layers: Mapping[int, list], stage: PipeStage) -> int:
    """Where a parent forward may stop: after the last layer with entries (this stage's first layer if none)."""
    return max(layers) + 1 if layers else stage.offset


def _entry_tensors(e: Entry, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    want = expected_shapes(cfg, e.layer, e.name)
    got = block_canonical(e.module, cfg, e.layer, e.block, subblocks=e.subblocks)  # collective over TP
    return {k: got[k].contiguous() for k in want}


def _check_done_entry(lib_root: Path, e: Entry, fp_hash: str) -> bool:
    """True if `e` is finished with the same settings; raises (by name) if finished with others."""
    path = entry_dir(lib_root, e.layer, e.name)
    if not (path / DONE_MARKER).exists():
        return False
    try:
        stats = json.loads((path / "stats.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LibraryError(f"library entry {entry_name(e.layer, e.name)} is corrupt ({err}); delete it and rerun") from None
    if stats.get("settings") != fp_hash:
        raise LibraryError(f"library entry {entry_name(e.layer, e.name)} was built with other BLD/init settings; "
                           f"delete {path} (or the whole library) to rebuild it, or rerun with its config")
    return True


def _wait_for_entries(root: Path, entries: Sequence[Entry], poll_s: float = 2.0, log_every_s: float = 60.0) -> None:
    """Poll the library until every entry is finished (written by whichever group trains it).
    No collective: a group that finished early never sits in one while another still trains."""
    last_log = time.perf_counter()
    while True:
        missing = [e for e in entries if not (entry_dir(root, e.layer, e.name) / DONE_MARKER).exists()]
        if not missing:
            return
        if time.perf_counter() - last_log >= log_every_s:
            log.info("BLD: waiting for %d entries trained by other ranks (e.g. %s)", len(missing),
                     entry_name(missing[0].layer, missing[0].name))
            last_log = time.perf_counter()
        time.sleep(poll_s)


def run_bld(parent_model, parent_tensors: Mapping[str, torch.Tensor], library_dir: str | Path,
            space: Sequence[Sequence[str]], bld: BLDConfig, init: InitConfig,
            train_batch: Callable[[int], torch.Tensor], eval_tokens: list[torch.Tensor],
            init_source: Library | Callable | None = None, *,
            stop_after_steps: int | None = None, stop_after_entries: int | None = None) -> BLDReport:
    """Build (or finish) the block library in `library_dir`.

    `parent_model`: the parent GPTModel (built at the current TP size; frozen here), or under
    pipeline parallelism this rank's stage of it (every stage calls `run_bld`);
    `parent_tensors`: its canonical tensors (read for the non-block tensors, and per
    layer only when `init_source` is None; at PP > 1 pass an `init_source`). `train_batch(step)` gives the tokens
    [batch, seq] of a step (the same on every rank); `eval_tokens` the held-out batches
    for the init/final loss. `init_source`: the init directory (a `Library`) or a
    function (layer, name) -> tensors; None computes the training-free init without
    calibration statistics (truncation / up-down) — pass calibrated init via
    `init_source` for the configured methods. `stop_after_*` simulate a killed run (tests).
    """
    t_start = time.perf_counter()
    cfg: ModelConfig = parent_model.puzzle_config
    root = Path(library_dir)
    fp = bld.fingerprint(init)
    fp_hash = fingerprint_hash(fp)
    pairs = pairs_of_space(space, bld.coupled_pairs)
    report = BLDReport()
    world_rank = dist.get_rank() if dist.is_initialized() else 0
    # read on every rank: a `CanonicalView` at TP > 1 gathers over the TP group
    non_block = {k: parent_tensors[k] for k in non_block_shapes(cfg)}
    if world_rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        write_space(root, [list(n) for n in space], pairs, cfg, {"bld": bld.to_dict(), "init": init.to_dict(),
                                                                  "settings": fp_hash})
        write_non_block(root, cfg, non_block)
    del non_block
    parallel.barrier()

    all_entries = entries_of_space(cfg, space, pairs, init)
    pending = [e for e in all_entries if not _check_done_entry(root, e, fp_hash)]
    parallel.barrier()  # every rank has looked before any rank writes (the last collective across groups)
    dp_rank, dp_size = parallel.dp_rank(), parallel.dp_size()
    stage = PipeStage(parent_model)
    # this pipeline stage's entries, dealt over its data-parallel groups
    mine = schedule([e for e in pending if e.layer in stage.layers], dp_size)[dp_rank]
    my_passes = passes(mine, bld.layers_per_pass)
    n_passes = max(stage.gather(len(my_passes)))  # the stages of a replica run their passes side by side
    log.info("BLD: %d entries, %d finished, %d on this rank (dp %d of %d, pp %d of %d, cost %d) in %d pass(es)",
             len(all_entries), len(all_entries) - len(pending), len(mine), dp_rank, dp_size, stage.rank, stage.size,
             sum(e.cost for e in mine), len(my_passes))

    def initial(e: Entry) -> dict[str, torch.Tensor]:
        if isinstance(init_source, Library):
            if e.kind == "pair":
                a, f = e.name.split("+")
                return {**init_source.load(e.layer, a), **init_source.load(e.layer, f)}
            return init_source.load(e.layer, e.name)
        if callable(init_source):
            return init_source(e.layer, e.name)
        if e.kind == "pair":
            return init_pair(cfg, parent_tensors, e.layer, e.name, init, None, bld.seed)[0]
        return init_variant(cfg, parent_tensors, e.layer, e.name, init, None, bld.seed)[0]

    written = 0

    def finish(e: Entry, final_loss: float) -> None:
        nonlocal written
        tensors = _entry_tensors(e, cfg)
        if parallel.tp_rank() == 0:
            write_entry(root, e.layer, e.name, tensors, {
                "init": e.method, "init_loss": e.init_loss, "final_loss": final_loss, "tokens": e.tokens,
                "steps": e.step, "wall_s": round(e.wall_s, 3), "kind": e.kind, "settings": fp_hash})
            shutil.rmtree(root / PARTIAL_DIR / f"layer_{e.layer:03d}" / e.name, ignore_errors=True)
        e.module = e.optimizer = None  # drop the entry's weights and optimizer state now
        written += 1
        report.entries_written += 1
        if stop_after_entries is not None and written >= stop_after_entries:
            raise Interrupted(f"stopped after {written} entries (test hook)")

    frozen = [p for p in parent_model.parameters() if p.requires_grad]
    for p in frozen:  # the parent is frozen; entries share its FFN modules
        p.requires_grad_(False)
    try:
        for k in range(n_passes):
            group = my_passes[k] if k < len(my_passes) else []
            report.passes += 1
            _train_pass(group, k, n_passes, cfg, parent_model, bld, initial, finish, root, fp_hash,
                        train_batch, eval_tokens, report, world_rank, dp_rank, stop_after_steps, stage)
    finally:
        for p in frozen:
            p.requires_grad_(True)

    _wait_for_entries(root, all_entries)
    if world_rank == 0:
        lib = Library(root)
        missing = [entry_name(i, n) for i, n in lib.entries() if not lib.has(i, n)]
        if missing:
            raise LibraryError(f"BLD finished but entries are missing: {missing[:5]}")
        atomic_write_text(root / DONE_MARKER, "ok\n")
        shutil.rmtree(root / PARTIAL_DIR, ignore_errors=True)
    parallel.barrier()  # every entry is written: no rank still trains
    report.wall_s = time.perf_counter() - t_start
    return report


def _train_step(training: list[Entry], layers: dict[int, list[Entry]], parent_model, tokens: torch.Tensor, step: int,
                end: int, tokens_per_step: int, report: BLDReport, stage: PipeStage) -> None:
    """One optimizer step of every entry due at `step`, fed by one parent forward (through this rank's
    pipeline stage: every stage runs it, also one with no entry due)."""
    for acts in _parent_layers(parent_model, tokens, end, report, stage):
        for e in layers.get(acts.layer, ()):
            if e.step != step:
                continue
            t1 = time.perf_counter()
            out, y = _run_entry(e, acts)
            loss = nmse(out, y)
            e.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            e.optimizer.step()
            e.step += 1
            e.tokens += tokens_per_step
            e.wall_s += time.perf_counter() - t1
            report.variant_s += time.perf_counter() - t1
            report.variant_tokens += tokens_per_step


def _train_pass(entries: list[Entry], k: int, n_passes: int, cfg: ModelConfig, parent_model, bld: BLDConfig,
                initial: Callable, finish: Callable, root: Path, fp_hash: str, train_batch: Callable,
                eval_tokens: list[torch.Tensor], report: BLDReport, world_rank: int, dp_rank: int,
                stop_after_steps: int | None, stage: PipeStage) -> None:
    """Build, train, evaluate and write one pass's entries; nothing of them is left alive after.
    Every pipeline stage of a replica calls it for its pass k together (`entries` may be empty)."""
    for e in entries:
        _build_entry(e, cfg, parent_model, initial(e), bld, stage)
        if e.trainable:
            load_partial(root, e, fp_hash)
    fresh = [e for e in entries if e.init_loss is None]
    training = [e for e in entries if e.trainable]
    # what the stages need: an init evaluation, training, and the first step to train from
    needs = stage.gather((bool(fresh), bool(training), min((e.step for e in training), default=bld.steps)))
    if any(n[0] for n in needs):  # init loss of the entries not evaluated yet
        t0 = time.perf_counter()
        losses = _evaluate(fresh, parent_model, eval_tokens, report, stage)
        for e in fresh:
            e.init_loss = losses[id(e)]
            e.wall_s += (time.perf_counter() - t0) / len(fresh)
    for e in [e for e in entries if not e.trainable]:  # parent and no-op variants are final now
        finish(e, e.init_loss)
    gc.collect()  # Megatron-Core layers hold reference cycles: free dropped entries now, not at some later gc
    if not any(n[1] for n in needs):
        return
    layers = _by_layer(training)
    end = _end(layers, stage)
    start = min(n[2] for n in needs)
    tokens_per_step = bld.batch_size * bld.seq_len
    desc = f"BLD rank {dp_rank}" + (f" pass {k + 1}/{n_passes}" if n_passes > 1 else "")
    bar = tqdm(range(start, bld.steps), desc=desc, disable=not bld.progress or world_rank != 0)
    t_loop = time.perf_counter()
    for step in bar:  # every step from the earliest entry's on trains some entry (of some stage)
        with _autocast(parent_model):
            _train_step(training, layers, parent_model, train_batch(step), step, end, tokens_per_step, report, stage)
        report.steps_run += 1
        report.tokens += tokens_per_step
        if (step + 1) % bld.checkpoint_every == 0 and step + 1 < bld.steps:
            for e in training:
                save_partial(root, e, fp_hash)
        if stop_after_steps is not None and report.steps_run >= stop_after_steps:
            raise Interrupted(f"stopped after {report.steps_run} steps (test hook)")
    report.train_s += time.perf_counter() - t_loop
    finals = _evaluate(training, parent_model, eval_tokens, report, stage)
    for e in training:
        finish(e, finals[id(e)])
    gc.collect()
