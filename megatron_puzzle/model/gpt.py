"""The heterogeneous GPT: Megatron-Core's GPTModel with one block config per layer.

Built entirely through Megatron-Core's own extension points: a
`HeterogeneousTransformerConfig` carrying the `block_configs` JSON and the layer
specs from `get_gpt_heterogeneous_layer_spec` (local torch modules on CPU,
Transformer Engine modules on GPU). Per-layer KV-head counts, FFN sizes, linear
and no-op subblocks all come from Megatron-Core's heterogeneous support; nothing
of Megatron is copied here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..arch import ModelConfig
from ..arch.block_config import AttentionVariant, variant_from_name
from . import cpu_support


class _DropUnknownMLPWarning(logging.Filter):
    """Megatron-Core warns "Unknown MLP type" for every linear / no-op FFN of a heterogeneous
    model (its own heterogeneous specs build them); the layers are correct, the line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_DropUnknownMLPWarning())


@dataclass
class RuntimeOptions:
    """How to run (not what to run): precision and kernels."""

    dtype: torch.dtype = torch.float32  # params and compute dtype: float32 on CPU, bfloat16 on GPU
    use_te: bool = False  # Transformer Engine layer specs (GPU only)
    fp8: str | None = None  # "hybrid" or "e4m3" through Transformer Engine (Hopper GPUs only)
    fp8_recipe: str = "delayed"  # "delayed" (amax history) or "tensorwise" (current scaling)
    sequence_parallel: bool = False
    recompute: bool = False  # full activation recomputation per layer
    first_stage_layers: int | None = None  # pipeline parallel: layers on the first stage (None: even split)
    last_stage_layers: int | None = None  # pipeline parallel: layers on the last stage (None: even split)


class GPUOnlyOptionError(RuntimeError):
    """A GPU-only option (Transformer Engine, FP8, bf16 kernels) was asked for without a GPU."""


def check_runtime(opts: RuntimeOptions) -> None:
    """Fail early, with the fix, when an option needs hardware or packages that are not here."""
    if opts.use_te or opts.fp8:
        if not torch.cuda.is_available():
            raise GPUOnlyOptionError(
                "Transformer Engine / FP8 need a CUDA GPU, and none is visible; "
                "drop --use-te/--fp8 (the CPU path uses Megatron-Core's local specs in fp32)"
            )
        try:
            import transformer_engine  # noqa: F401
        except ImportError:
            raise GPUOnlyOptionError(
                "Transformer Engine is not installed; use the project's Docker image "
                "(NGC PyTorch base) or `pip install -r requirements-gpu.txt`"
            ) from None
    if opts.fp8 and torch.cuda.get_device_capability()[0] < 9:
        raise GPUOnlyOptionError(f"FP8 needs a Hopper or newer GPU (compute capability >= 9.0), found {torch.cuda.get_device_name()}")
    if opts.sequence_parallel and not opts.use_te:
        raise GPUOnlyOptionError("sequence parallelism needs Transformer Engine norms (GPU); Megatron-Core refuses it "
                                 "with the local (torch) specs: drop --sequence-parallel on CPU")


def transformer_config(cfg: ModelConfig, opts: RuntimeOptions | None = None, *, pipeline: bool = True):
    """Megatron-Core `HeterogeneousTransformerConfig` for a model config.

    `pipeline=False`: a config outside the pipeline split (PP 1), for a standalone layer that
    any stage may build (its layer number is then not shifted by a stage's offset)."""
    from megatron.core.transformer.heterogeneous.heterogeneous_config import HeterogeneousTransformerConfig

    from megatron.core import parallel_state

    opts = opts or RuntimeOptions()
    on_gpu = torch.cuda.is_available()
    # the layout Megatron-Core reads from the config (layer offsets of a pipeline stage, SP checks)
    tp = pp = 1
    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size() if pipeline else 1
    fp8_kwargs = {}
    if opts.fp8:
        fp8_kwargs = dict(fp8=opts.fp8, fp8_recipe=opts.fp8_recipe, fp8_margin=0, fp8_amax_history_len=1024,
                          fp8_amax_compute_algo="max")
    return HeterogeneousTransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_kv_heads,
        ffn_hidden_size=cfg.intermediate_size,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # fused kernels are CUDA-only; keep the plain paths so CPU and GPU agree
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        params_dtype=opts.dtype,
        bf16=opts.dtype == torch.bfloat16,
        fp16=opts.dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        sequence_parallel=opts.sequence_parallel,
        recompute_granularity="full" if opts.recompute else None,
        recompute_method="uniform" if opts.recompute else None,
        recompute_num_layers=1 if opts.recompute else None,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,  # what stages send each other (fp32 master weights; GKD's p2p)
        num_layers_in_first_pipeline_stage=opts.first_stage_layers if pipeline else None,
        num_layers_in_last_pipeline_stage=opts.last_stage_layers if pipeline else None,
        heterogeneous_layers_config_encoded_json=json.dumps({"block_configs": cfg.block_configs_json()}),
        **fp8_kwargs,
    )


def build_model(cfg: ModelConfig, opts: RuntimeOptions | None = None, *, pre_process: bool | None = None,
                post_process: bool | None = None):
    """A Megatron-Core GPTModel for `cfg` on the current TP group (call `init_distributed` first).

    Under pipeline parallelism it is this rank's stage: the embedding on the first stage
    (`pre_process`), the final norm and output layer on the last (`post_process`), and
    the stage's layers (None: from Megatron-Core's pipeline state).

    Weights are randomly initialised; load real ones with `convert.megatron_layout`
    or `checkpoint.load`. The same seed gives the same weights at any TP size.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs import get_gpt_heterogeneous_layer_spec

    from megatron.core import parallel_state

    opts = opts or RuntimeOptions()
    check_runtime(opts)
    cpu_support.apply()
    if pre_process is None:
        pre_process = not parallel_state.model_parallel_is_initialized() or parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = not parallel_state.model_parallel_is_initialized() or parallel_state.is_pipeline_last_stage()
    tcfg = transformer_config(cfg, opts)
    _pipeline_stage_config(tcfg)
    spec = get_gpt_heterogeneous_layer_spec(tcfg, use_te=opts.use_te)
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta,
    )
    # Megatron-Core's llama3 RoPE scaling hard-codes three of its four parameters;
    # set the exact frequencies of this model (computed in float64) instead.
    if getattr(model, "rotary_pos_emb", None) is not None:
        inv = cfg.rope_inv_freq().to(torch.float32)
        model.rotary_pos_emb.inv_freq = inv.to(model.rotary_pos_emb.inv_freq.device)
    model.puzzle_config = cfg  # the arch-level description travels with the module
    if torch.cuda.is_available():
        model.cuda()
    return model


def _pipeline_stage_config(tcfg) -> None:
    """Under pipeline parallelism, Megatron-Core builds only this stage's layers when its config knows the PP size."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        tcfg.pipeline_model_parallel_size = parallel_state.get_pipeline_model_parallel_world_size()
        tcfg.pipeline_dtype = tcfg.params_dtype


def build_layer(cfg: ModelConfig, block, layer_number: int = 1, opts: RuntimeOptions | None = None):
    """One standalone Megatron-Core TransformerLayer for `block` (a BlockConfig), shaped like `cfg`'s layers.

    Used where a block is trained or swapped alone (BLD, replace-1-block scoring):
    the layer takes and returns hidden states [seq, batch, hidden] exactly as the
    layers inside a GPTModel do (call it as `layer(h, attention_mask=None, rotary_pos_emb=rope)`).
    """
    from megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs import get_gpt_heterogeneous_layer_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    opts = opts or RuntimeOptions()
    check_runtime(opts)
    cpu_support.apply()
    one = replace(cfg, num_layers=1, blocks=[block])
    tcfg = transformer_config(one, opts, pipeline=False)
    spec = get_gpt_heterogeneous_layer_spec(tcfg, use_te=opts.use_te).layer_specs[0]
    layer = build_module(spec, config=tcfg.get_config_for_layer(1), layer_number=layer_number,
                         pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    if torch.cuda.is_available():
        layer.cuda()
    return layer


def layer_prefix(layer_index: int) -> str:
    """Megatron-Core parameter-name prefix of decoder layer `layer_index` inside a GPTModel."""
    return f"decoder.layers.{layer_index}."


class LayoutError(ValueError):
    """Parallel sizes that cannot split this model; raised before any model is built."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _stage_layers(num_layers: int, pp: int, first: int | None, last: int | None) -> list[int] | None:
    """Layers per pipeline stage as Megatron-Core splits them, or None when it cannot."""
    if pp == 1:
        return [num_layers] if first is None and last is None else None
    fixed = [x for x in (first, last) if x is not None]
    middle_stages = pp - len(fixed)
    rest = num_layers - sum(fixed)
    if any(x < 0 for x in fixed) or rest < 0 or (middle_stages == 0 and rest != 0):
        return None
    if middle_stages and (rest % middle_stages or rest == 0):
        return None
    each = rest // middle_stages if middle_stages else 0
    stages = [each] * pp
    if first is not None:
        stages[0] = first
    if last is not None:
        stages[-1] = last
    return stages


def launch_world() -> int:
    """The number of processes this command was launched with (torchrun's WORLD_SIZE), before or
    after the process group exists."""
    import os

    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def _check_attention(where: str, attention, cfg: ModelConfig, tp: int, fp8: bool) -> None:
    kv = attention.num_kv_heads if attention.kind == "full" else None
    if kv is None:
        return
    heads = cfg.num_attention_heads
    if kv % tp and tp % kv:
        valid = sorted({d for d in _divisors(heads) if kv % d == 0 or d % kv == 0})
        raise LayoutError(f"{where}: TP {tp} neither splits nor replicates its {kv} KV heads; valid TP: "
                          f"{', '.join(map(str, valid))}")
    if fp8 and (max(kv // tp, 1) * cfg.head_dim) % 16:
        raise LayoutError(f"{where}: FP8 needs each TP shard's KV width to be a multiple of 16, got "
                          f"{max(kv // tp, 1)} heads x {cfg.head_dim}; change TP or drop --fp8")


def _check_ffn(where: str, ffn_variant, cfg: ModelConfig, tp: int, fp8: bool) -> None:
    ffn = ffn_variant.intermediate_size if ffn_variant.kind == "full" else None
    if ffn is None:
        return
    if ffn % tp:
        raise LayoutError(f"{where}: TP {tp} does not split its FFN size {ffn}; valid TP: "
                          f"{', '.join(str(d) for d in _divisors(cfg.num_attention_heads) if ffn % d == 0)}")
    if fp8 and (ffn // tp) % 16:
        raise LayoutError(f"{where}: FP8 needs each TP shard's FFN size to be a multiple of 16, got "
                          f"{ffn} / TP {tp} = {ffn // tp}; choose a round_to multiple of {16 * tp} or drop --fp8")


def check_layout(cfg: ModelConfig, *, tp: int = 1, pp: int = 1, world: int | None = None, fp8: bool = False,
                 first_stage_layers: int | None = None, last_stage_layers: int | None = None,
                 what: str = "model", variants: list[list[str]] | None = None) -> None:
    """Refuse parallel sizes the model cannot be split by, in one line naming the layer, the size
    and the valid choices. Pure arithmetic on the config: every rank raises the same error
    before any model is built (no rank is left waiting in a collective).

    `variants` (a search space: variant names per layer) checks every variant a stage may build
    too (BLD, scoring), naming the layer and the variant."""
    if tp < 1 or pp < 1:
        raise LayoutError(f"tensor and pipeline parallel sizes must be >= 1, got TP {tp}, PP {pp}")
    heads = cfg.num_attention_heads
    if heads % tp:
        raise LayoutError(f"TP {tp} does not split the {what}'s {heads} query heads; valid TP: "
                          f"{', '.join(map(str, _divisors(heads)))}")
    for i, block in enumerate(cfg.blocks):
        _check_attention(f"layer {i}", block.attention, cfg, tp, fp8)
        _check_ffn(f"layer {i}", block.ffn, cfg, tp, fp8)
    if variants is not None:
        for i, names in enumerate(variants):
            for name in names:
                for part in name.split("+"):  # a coupled entry names its attention and FFN variants
                    v = variant_from_name(part)
                    check = _check_attention if isinstance(v, AttentionVariant) else _check_ffn
                    check(f"layer {i} variant {part}", v, cfg, tp, fp8)
    layers = cfg.num_layers
    if pp > layers:
        raise LayoutError(f"PP {pp} exceeds the {what}'s {layers} layers; valid PP: 1..{layers}")
    if _stage_layers(layers, pp, first_stage_layers, last_stage_layers) is None:
        if first_stage_layers is None and last_stage_layers is None:
            raise LayoutError(f"PP {pp} does not split the {what}'s {layers} layers evenly; valid PP: "
                              f"{', '.join(map(str, _divisors(layers)))}, or set the first/last stage's layers")
        raise LayoutError(f"first/last pipeline stage layers {first_stage_layers}/{last_stage_layers} leave "
                          f"{layers} layers unsplittable over PP {pp}; the other stages must get equal, positive counts")
    # the launch last: first what the model itself allows
    if world is not None and world % (tp * pp):
        raise LayoutError(f"{world} processes are not a multiple of TP x PP = {tp} x {pp} = {tp * pp}; launch a "
                          f"multiple of {tp * pp} (torchrun --nproc-per-node) or change --tp/--pp")
