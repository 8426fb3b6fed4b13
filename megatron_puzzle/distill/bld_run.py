"""The init and BLD stages over a run directory: RUN/parent + RUN/data -> RUN/init, RUN/library.

Entry functions: `run_init(run_dir, RunConfig)` and `run_bld(run_dir, RunConfig)`.

The run config (YAML; `--config FILE`, else RUN/config.yaml when present) may hold
three sections, each optional: `search_space` (`arch.search_space.SearchSpaceConfig`),
`init` (`init.InitConfig`) and `bld` (`distill.bld.BLDConfig`).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..arch.search_space import SearchSpaceConfig, configured_search_space
from ..init.stage import run_init as init_entries
from ..init.variants import InitConfig
from ..library import Library
from ..utils.errors import InputError
from .bld import BLDConfig, BLDReport, run_bld as train_entries

log = logging.getLogger(__name__)
SECTIONS = ("search_space", "init", "bld")


@dataclass
class RunConfig:
    space: SearchSpaceConfig
    init: InitConfig
    bld: BLDConfig

    @classmethod
    def from_dict(cls, d: dict | None) -> "RunConfig":
        d = d or {}
        return cls(SearchSpaceConfig.from_dict(d.get("search_space")), InitConfig.from_dict(d.get("init")),
                   BLDConfig.from_dict(d.get("bld")))


def load_run_config(run_dir: str | Path, config: str | Path | None = None) -> RunConfig:
    """Read the BLD-related sections of a YAML run config; other sections are left to their stages."""
    import yaml

    path = Path(config) if config else Path(run_dir) / "config.yaml"
    if config and not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if not path.exists():
        return RunConfig.from_dict({})
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping with sections {SECTIONS}")
    return RunConfig.from_dict({k: data.get(k) for k in SECTIONS})


def _load_parent(run: Path, tp: int, dtype: torch.dtype = torch.float32):
    from ..convert.megatron_layout import CanonicalView
    from ..model import checkpoint
    from ..model.gpt import RuntimeOptions
    from ..model.parallel import init_distributed

    init_distributed(tensor_parallel=tp)
    model = checkpoint.load(run / "parent", RuntimeOptions(dtype=dtype))  # bld.dtype: bf16 on a GPU
    model.to(dtype)  # the local specs' norms too: the frozen parent runs wholly in its dtype
    model.eval()
    # the parent's canonical tensors read one layer at a time (gathered over TP when read): no host copy
    # of the model at any TP; init and BLD read the layers in step on every rank of a TP group
    return model, CanonicalView(model)


def _batches(run: Path, split: str, cfg: BLDConfig, shuffle: bool):
    from ..data import TokenBatches

    # rank 0 of a world of one on every rank: the data order does not depend on the rank count
    return TokenBatches(run / "data", cfg.seq_len, cfg.batch_size, seed=cfg.seed, shuffle=shuffle, split=split,
                        epochs=None)


def _check_layout(parent_cfg, bld: BLDConfig, pp: int, space) -> None:
    """TP / PP sizes against the parent's layers, every search-space variant and the launch: one line on
    every rank before any work."""
    from ..model.gpt import check_layout, launch_world

    check_layout(parent_cfg, tp=bld.tensor_parallel, pp=pp, world=launch_world(),
                 first_stage_layers=bld.pp_first_stage_layers if pp > 1 else None,
                 last_stage_layers=bld.pp_last_stage_layers if pp > 1 else None, what="parent", variants=space)


def _load_parent_stage(run: Path, bld: BLDConfig):
    """This rank's pipeline stage of the parent (Megatron-Core's split over bld.pipeline_parallel stages),
    wholly in bld.dtype like `_load_parent`."""
    from ..model import checkpoint
    from ..model.gpt import RuntimeOptions
    from ..model.parallel import init_distributed

    init_distributed(tensor_parallel=bld.tensor_parallel, pipeline_parallel=bld.pipeline_parallel)
    dtype = bld.torch_dtype()
    model = checkpoint.load(run / "parent", RuntimeOptions(dtype=dtype, first_stage_layers=bld.pp_first_stage_layers,
                                                           last_stage_layers=bld.pp_last_stage_layers))
    model.to(dtype)
    return model.eval()


def build_library(run_dir: str | Path, config: RunConfig | str | Path | None = None, *, init_only: bool = False,
                  **hooks) -> BLDReport | None:
    """The init stage (RUN/init) then BLD (RUN/library). Resumes whatever a killed run left.

    With bld.pipeline_parallel > 1, init (when not yet complete) still runs on the whole parent
    (PP 1, entries dealt over all ranks); BLD then loads the parent split over the stages."""
    from ..init.stage import is_complete
    from ..model import checkpoint

    run = Path(run_dir)
    rc = config if isinstance(config, RunConfig) else load_run_config(run, config)
    for need in ("parent", "data"):
        if not (run / need / "done").exists():
            raise FileNotFoundError(f"{run / need} is missing or unfinished; run the "
                                    f"`{'import' if need == 'parent' else 'data'}` stage first")
    pp = 1 if init_only else rc.bld.pipeline_parallel
    parent_cfg = checkpoint.load_config(run / "parent")
    try:
        space = configured_search_space(parent_cfg, rc.space)
    except ValueError as e:  # a search space that does not fit this parent
        raise InputError(f"search_space: {e}") from None
    # every entry BLD builds is split like the parent: refuse a layout some variant cannot take
    _check_layout(parent_cfg, rc.bld, pp, space)
    model = tensors = None
    if pp == 1 or not is_complete(run / "init", space, rc.init, rc.bld.seed):
        model, tensors = _load_parent(run, rc.bld.tensor_parallel, rc.bld.torch_dtype())
        calib = _batches(run, "calib", rc.bld, shuffle=False)
        calib_tokens = [calib.batch(i) for i in range(min(rc.init.calib_batches, calib.batches_per_epoch))]
        with torch.no_grad():
            init_entries(model, tensors, run / "init", space, rc.init, calib_tokens, seed=rc.bld.seed,
                         progress=rc.bld.progress)
    init_dir = run / "init"
    if init_only:
        return None
    if pp > 1:  # the whole parent (if init needed it) gives way to this rank's stage
        del model, tensors
        gc.collect()  # Megatron-Core modules hold reference cycles
        model = _load_parent_stage(run, rc.bld)
        tensors = Library(init_dir).non_block()  # the parent's non-block tensors, as init wrote them
    train = _batches(run, "train", rc.bld, shuffle=True)
    held = _batches(run, "heldout", rc.bld, shuffle=False)
    eval_tokens = [held.batch(i) for i in range(min(rc.bld.eval_batches, held.batches_per_epoch))]
    report = train_entries(model, tensors, run / "library", space, rc.bld, rc.init, train.batch, eval_tokens,
                     Library(init_dir), **hooks)
    log.info("BLD: %s", report.throughput())
    return report


def run_init(run_dir: str | Path, config: RunConfig) -> None:
    """The init stage: RUN/parent + RUN/data -> RUN/init. Every rank works (entries dealt over ranks)."""
    build_library(run_dir, config, init_only=True)


def run_bld(run_dir: str | Path, config: RunConfig) -> BLDReport:
    """The bld stage (init first, if not done): RUN/init -> RUN/library. Every rank works (entries dealt over
    data-parallel ranks; with bld.pipeline_parallel > 1, over the pipeline stages holding their layers)."""
    return build_library(run_dir, config)
