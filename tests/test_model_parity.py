"""The Megatron-Core model against transformers' LlamaForCausalLM (an independent implementation)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from _models import every_variant_child
from megatron_puzzle.arch import ModelConfig
from megatron_puzzle.arch.shapes import canonical_shapes, random_canonical
from megatron_puzzle.convert.megatron_layout import canonical_state, from_megatron, load_canonical, to_megatron
from megatron_puzzle.model import forward
from megatron_puzzle.model.gpt import build_model


def _llama(tie: bool, kv: int, rope_scaling=None, seed=0):
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 50000.0}
    if rope_scaling:
        rope = dict(rope_scaling, rope_theta=50000.0)
    hf = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=kv, rope_parameters=rope, tie_word_embeddings=tie, rms_norm_eps=1e-6,
                     max_position_embeddings=256)
    model = LlamaForCausalLM(hf).eval()
    with torch.no_grad():  # norms are ones at init; randomise them so the test sees them
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return hf, model


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize("tie,kv,scaling", [(False, 2, None), (True, 2, None), (False, 4, None), (True, 1, LLAMA3)])
def test_llama_logits_match_transformers(mcore, tie, kv, scaling):
    hf, ref = _llama(tie, kv, scaling)
    cfg = ModelConfig.from_hf(hf)
    assert cfg.tie_word_embeddings == tie and cfg.num_kv_heads == kv and cfg.rope_theta == 50000.0
    model = build_model(cfg)
    load_canonical(model, ref.state_dict())
    tokens = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = forward.full_logits(model, tokens)
        theirs = ref(tokens).logits
        assert torch.equal(model(tokens, None, None), ours)  # the pieces equal GPTModel.forward
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_llama3_inv_freq_matches_transformers():
    hf, ref = _llama(False, 2, LLAMA3)
    ours = ModelConfig.from_hf(hf).rope_inv_freq()
    theirs = ref.model.rotary_emb.inv_freq.double()
    assert torch.allclose(ours, theirs, rtol=1e-6)


def test_layout_round_trip_every_variant(mcore):
    cfg = every_variant_child()
    w = random_canonical(cfg, seed=5)
    assert set(w) == set(canonical_shapes(cfg))
    assert {k: v for k, v in from_megatron(cfg, to_megatron(cfg, w)).items()}.keys() == w.keys()
    model = build_model(cfg)
    load_canonical(model, w)
    back = canonical_state(model)
    assert all(torch.equal(back[k], w[k]) for k in w)


def test_load_canonical_names_missing_tensor(mcore):
    cfg = every_variant_child()
    w = random_canonical(cfg)
    del w["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(KeyError, match="k_proj"):
        load_canonical(build_model(cfg), w)


def test_standalone_layers_reproduce_model_layers(mcore):
    """build_layer + load_block give the same block outputs as the layers inside the GPTModel."""
    from megatron_puzzle.convert.megatron_layout import block_canonical, load_block
    from megatron_puzzle.model.gpt import build_layer

    cfg = every_variant_child()
    w = random_canonical(cfg, seed=2)
    model = build_model(cfg)
    load_canonical(model, w)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = forward.embed(model, tokens)
        rope = forward.rotary(model, 12)
        _, outs = forward.run_layers(model, h, collect=True)
        for i, b in enumerate(cfg.blocks):
            layer = build_layer(cfg, b, layer_number=i + 1)
            load_block(layer, cfg, i, b, w)
            out, _ = layer(h if i == 0 else outs[i - 1], attention_mask=None, rotary_pos_emb=rope)
            assert torch.equal(out, outs[i])
            back = block_canonical(layer, cfg, i, b)
            assert back.keys() and all(torch.equal(v, w[k]) for k, v in back.items())


# The CPU redirections (model/cpu_support.py): each spot must still exist in the installed
# Megatron-Core, and still need redirecting; when Megatron changes one, this test names it.
_NEEDS = {  # (module, attribute) -> text its original source still contains
    ("megatron.core.optimizer.optimizer", "torch"): "device='cuda'",
    ("megatron.core.optimizer.clip_grads", "torch"): "device='cuda'",
    ("megatron.core.optimizer.grad_scaler", "torch"): "device='cuda'",
    ("megatron.core.utils", "torch"): 'device="cuda"',
    ("megatron.core.pipeline_parallel.schedules", "torch"): 'device="cuda"',
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"): "'torch.cuda.FloatTensor'",
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"): "'torch.cuda.FloatTensor'",
    ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer", "__init__"): "_build_model_and_main_param_groups",
    ("megatron.core.models.common.language_module.language_module.LanguageModule",
     "setup_embeddings_and_output_layer"): "weight.data.cuda()",
    ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer", "get_parameter_state_dp_zero"):
        "send_tensor.cuda()",
    ("megatron.core.transformer.utils", "get_default_causal_mask"): 'device="cuda"',
    ("megatron.core.tensor_parallel.random", "_get_all_rng_states"): "_get_cuda_rng_state(",
    ("megatron.core.tensor_parallel.random", "_set_all_rng_states"): "_set_cuda_rng_state(",
}


def _resolve(path: str):
    import importlib

    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def test_cpu_redirections_still_match_megatron(mcore):
    import inspect

    from megatron_puzzle.model import cpu_support

    assert {k for k in _NEEDS if not k[1].endswith("_all_rng_states")} <= set(cpu_support.REDIRECTED)
    for module, attr in cpu_support.REDIRECTED:
        owner = _resolve(module)
        assert hasattr(owner, attr), f"{module}.{attr} no longer exists in megatron-core: revisit cpu_support"
    if torch.cuda.is_available():
        return
    for (module, attr), text in _NEEDS.items():
        owner = _resolve(module)
        if attr == "torch":  # the module's own source still allocates on "cuda"
            source = inspect.getsource(owner)
            assert isinstance(owner.torch, cpu_support._CPUTorch), f"{module}.torch is not redirected"
        else:
            fn = getattr(owner, attr)
            assert getattr(fn, "_cpu_support_wrapped", False) or module.endswith(("transformer.utils", ".random")), \
                (module, attr)
            source = inspect.getsource(inspect.unwrap(fn)) if attr != "get_default_causal_mask" else \
                inspect.getsource(_resolve(module))
        assert text in source, f"{module}.{attr}: megatron-core no longer has {text!r}; drop or update the redirection"
    # the DistributedOptimizer's setup still checks CUDA type strings (in a helper it calls)
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    assert "'torch.cuda.FloatTensor'" in inspect.getsource(DistributedOptimizer._build_model_and_main_param_groups)
    # and the type names are CUDA ones only inside the redirected calls
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with cpu_support._cuda_type_names():
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    # 9: the TP linear functions still bind custom_bwd to CUDA, so CPU autocast needs re-entering in backward
    from megatron.core.tensor_parallel import layers as tp_layers

    assert 'custom_bwd = partial(torch.amp.custom_bwd, device_type="cuda")' in inspect.getsource(tp_layers)


def test_bf16_autocast_backward_through_megatron_linear_on_cpu(mcore):
    """Redirection 9: under CPU bf16 autocast, Megatron's TP linear gives the float64 gradients to bf16
    accuracy (its backward would otherwise multiply a bf16 gradient with the fp32 weight and fail)."""
    if torch.cuda.is_available():
        pytest.skip("CPU autocast path")
    from megatron.core.tensor_parallel.layers import (LinearWithGradAccumulationAndAsyncCommunication,
                                                      linear_with_grad_accumulation_and_async_allreduce)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 16, generator=g, requires_grad=True)
    w = torch.randn(8, 16, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear_with_grad_accumulation_and_async_allreduce(x, w, None, False, False, False)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (x64 @ w64.T).square().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32
    for got, ref in ((x.grad, x64.grad), (w.grad, w64.grad)):
        assert torch.allclose(got.double(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item()), (got, ref)
    # and without the redirection the same backward fails as Megatron-Core ships it
    fn = LinearWithGradAccumulationAndAsyncCommunication
    patched = fn.forward, fn.backward
    fn.forward, fn.backward = (staticmethod(patched[0].cpu_support_original),
                               staticmethod(patched[1].cpu_support_original))
    try:
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = linear_with_grad_accumulation_and_async_allreduce(x, w, None, False, False, False)
        with pytest.raises(RuntimeError, match="same dtype"):
            y.float().square().sum().backward()
    finally:
        fn.forward, fn.backward = (staticmethod(patched[0]), staticmethod(patched[1]))


def test_te_extra_state_keys_and_local_checkpoints_load_into_each_other(mcore, tmp_path):
    """Transformer Engine modules add `_extra_state` (FP8 scaling state) to a model's sharded state
    dict. A model asking for them loads a local-spec (CPU) checkpoint, which has none; a checkpoint
    holding them loads into local specs. Shown on CPU with the entries added as TE would add them."""
    import io

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from _models import tiny_parent
    from megatron_puzzle.model import checkpoint

    # TE norms have extra state that torch norms lack; local linear layers already save theirs (empty)
    keys = ("decoder.final_layernorm._extra_state", "decoder.layers.1.pre_mlp_layernorm._extra_state",
            "decoder.layers.0.self_attention.linear_qkv._extra_state")
    absent_locally = set(keys[:2])

    def asks_for_te_extra_state(model):
        real = model.sharded_state_dict

        def sharded_state_dict(*args, **kwargs):
            out = real(*args, **kwargs)
            for key in keys:
                out[key] = ShardedObject(key, io.BytesIO(b"fp8 scaling state"), (1,), (0,), replica_id=0)
            return out

        model.sharded_state_dict = sharded_state_dict
        return model

    cfg = tiny_parent(num_layers=2)
    torch.manual_seed(0)
    local = build_model(cfg)
    checkpoint.save(local, tmp_path / "local")
    torch.manual_seed(1)
    te_like = asks_for_te_extra_state(build_model(cfg))
    # without dropping the absent keys, Megatron-Core's load fails on them
    import traceback

    with pytest.raises(BaseException) as failed:  # torch's CheckpointException is a BaseException
        dist_checkpointing.load(te_like.sharded_state_dict(), str(tmp_path / "local"))
    assert "Missing key in checkpoint state_dict: decoder.final_layernorm._extra_state" in \
        "".join(traceback.format_exception(failed.value))
    checkpoint.load_into(te_like, tmp_path / "local")
    want = local.state_dict()
    got = te_like.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items() if torch.is_tensor(v) and not k.endswith("_extra_state"))

    checkpoint.save(te_like, tmp_path / "te")  # holds the extra state objects
    meta = dist_checkpointing.serialization.load_sharded_metadata(str(tmp_path / "te"))
    assert set(keys) <= {v.key for v in meta.values()}
    torch.manual_seed(2)
    plain = build_model(cfg)
    checkpoint.load_into(plain, tmp_path / "te")
    got = plain.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items() if torch.is_tensor(v) and not k.endswith("_extra_state"))
    # a TE-spec checkpoint read by a TE-spec model keeps its extra state
    assert set(keys) <= set(checkpoint._without_absent_extra_state(te_like.sharded_state_dict(), tmp_path / "te"))
    kept = set(checkpoint._without_absent_extra_state(te_like.sharded_state_dict(), tmp_path / "local"))
    assert not absent_locally & kept and keys[2] in kept


def test_engine_on_cpu_redirects_only_while_open(mcore):
    """The plan's context (cpu_support item 9): its spots exist, are redirected inside, restored after."""
    from megatron.core.optimizer import clip_grads

    from megatron_puzzle.model import cpu_support

    for module, attr in cpu_support.REDIRECTED_IN_CONTEXT:
        assert hasattr(_resolve(module), attr), f"{module}.{attr} no longer exists: revisit cpu_support"
    before = (torch.tensor, torch.zeros, torch.Tensor.type, clip_grads.l2_norm_impl)
    with cpu_support.engine_on_cpu():
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        t = [torch.tensor([3.0]), torch.tensor([4.0])]
        norm, _ = clip_grads.l2_norm_impl(1, None, [t], False)
        assert norm.item() == pytest.approx(5.0)
    assert (torch.tensor, torch.zeros, torch.Tensor.type, clip_grads.l2_norm_impl) == before
    assert torch.zeros(1).type() == "torch.FloatTensor"
