"""HF <-> Megatron-Core conversion through the `megatron-puzzle` command, checked against transformers."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from _models import every_variant_child
from megatron_puzzle.arch.shapes import random_canonical
from megatron_puzzle.cli import main
from megatron_puzzle.convert.megatron_io import export_model
from megatron_puzzle.convert.megatron_layout import load_canonical
from megatron_puzzle.model import checkpoint, forward
from megatron_puzzle.model.gpt import build_model

TOKENS = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(7))


def _llama(tmp_path, tie):
    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, tie_word_embeddings=tie, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 20000.0})
    model = LlamaForCausalLM(hf).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama", model


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def llama_dir(request, tmp_path):
    return _llama(tmp_path, request.param)


def test_import_export_round_trip_matches_llama(mcore, llama_dir, tmp_path):
    src, ref = llama_dir
    assert main(["import-hf", str(src), str(tmp_path / "mc")]) == 0
    model = checkpoint.load(tmp_path / "mc")
    with torch.no_grad():
        theirs = ref(TOKENS).logits
        assert (forward.full_logits(model, TOKENS) - theirs).abs().max().item() <= 1e-4
    assert main(["export-hf", str(tmp_path / "mc"), str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert len(cfg["block_configs"]) == 3 and "AutoModelForCausalLM" in cfg["auto_map"]
    decilm = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    with torch.no_grad():
        assert (decilm(TOKENS).logits - theirs).abs().max().item() <= 1e-4


def test_import_of_the_first_layers_matches_a_cut_llama(mcore, tmp_path):
    """`import_hf(..., layers=2)` (the quick profile's parent cut) equals HF Llama cut to its first 2 layers."""
    from megatron_puzzle.convert.megatron_io import import_hf
    from megatron_puzzle.utils.errors import InputError

    src, full = _llama(tmp_path, tie=False)
    cut = LlamaForCausalLM(LlamaConfig(**{**full.config.to_dict(), "num_hidden_layers": 2})).eval()
    missing, unexpected = cut.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(k.startswith("model.layers.2.") for k in unexpected)
    import_hf(src, tmp_path / "mc", layers=2)
    model = checkpoint.load(tmp_path / "mc")
    assert model.puzzle_config.num_layers == 2 and checkpoint.load_extra(tmp_path / "mc")["parent_layers"] == 2
    with torch.no_grad():
        assert (forward.full_logits(model, TOKENS) - cut(TOKENS).logits).abs().max().item() <= 1e-4
    with pytest.raises(InputError, match="parent_layers=4 but the parent has 3 layers"):
        import_hf(src, tmp_path / "mc4", layers=4)
    assert not (tmp_path / "mc4").exists()


def test_heterogeneous_child_export_matches_megatron(mcore, tmp_path):
    cfg = every_variant_child()
    model = build_model(cfg)
    load_canonical(model, random_canonical(cfg, seed=11))
    export_model(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    tokens = TOKENS % cfg.vocab_size
    with torch.no_grad():
        ours = forward.full_logits(model, tokens)
        assert (hf(tokens).logits - ours).abs().max().item() <= 1e-4
        # generate() runs with a KV cache across layers of different KV heads and no-op attention
        out = hf.generate(tokens[:1, :5], max_new_tokens=6, do_sample=False)
        ref = tokens[:1, :5]
        for _ in range(6):  # greedy decoding with full recomputation in Megatron
            nxt = forward.full_logits(model, ref)[:, -1].argmax(-1, keepdim=True)
            ref = torch.cat([ref, nxt], dim=1)
    assert torch.equal(out, ref)


def test_cli_refuses_bad_input_without_leaving_output(mcore, tmp_path, capsys):
    assert main(["import-hf", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["import-hf", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "config.json" in capsys.readouterr().err
    bad = tmp_path / "noweights"
    bad.mkdir()
    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(bad)
    assert main(["import-hf", str(bad), str(tmp_path / "out")]) == 2
    assert "weights" in capsys.readouterr().err.lower()
    assert not (tmp_path / "out").exists()
    assert main(["export-hf", str(tmp_path / "empty"), str(tmp_path / "out2")]) == 2
    assert "not a complete" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])


def test_truncated_or_corrupt_weights_name_the_file_and_leave_no_output(mcore, tmp_path, capsys):
    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2)
    src = tmp_path / "llama"
    LlamaForCausalLM(hf).save_pretrained(src, max_shard_size="60KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 2
    pristine = {f: f.read_bytes() for f in shards}
    out = tmp_path / "out"
    capsys.readouterr()  # save_pretrained's progress bars
    for damage in ("truncated data", "truncated header", "garbage"):
        f = shards[1]
        if damage == "truncated data":
            _truncate(f, -100)
        elif damage == "truncated header":
            _truncate(f, 6)
        else:
            f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        assert main(["import-hf", str(src), str(out)]) == 2, damage
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f.name in err and "download it again" in err, (damage, err)
        assert not out.exists()
        f.write_bytes(pristine[f])
    # bf16 weights are read as bf16 and land in the fp32 model exactly
    model = LlamaForCausalLM(hf).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    from megatron_puzzle.convert.hf_io import open_hf_checkpoint

    reader = open_hf_checkpoint(tmp_path / "bf16")
    assert reader.get("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    assert main(["import-hf", str(tmp_path / "bf16"), str(tmp_path / "mc16")]) == 0
    with torch.no_grad():
        ours = forward.full_logits(checkpoint.load(tmp_path / "mc16"), TOKENS)
        theirs = model.float()(TOKENS).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_truncated_gguf_names_the_file(mcore, tmp_path, capsys):
    from megatron_puzzle.convert.hf_io import default_parent_path

    try:
        gguf = default_parent_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    bad = tmp_path / "cut.gguf"
    with open(gguf, "rb") as f:
        bad.write_bytes(f.read(3 << 20))  # the header and the first tensors only
    assert main(["import-hf", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cut.gguf" in err, err
    assert not (tmp_path / "out").exists()


def test_import_and_export_at_tp2_stream_each_rank_its_partition(tmp_path):
    """import-hf and export-hf under torchrun at TP 2 (each rank reads one layer at a time and keeps its
    half; export gathers one layer at a time) give the HF model's logits."""
    from _models import REPO, torchrun

    src, ref = _llama(tmp_path, tie=True)
    worker = REPO / "tests" / "workers" / "convert_worker.py"
    torchrun(worker, 2, "import-hf", str(src), str(tmp_path / "mc"), "--tp", "2")
    torchrun(worker, 2, "export-hf", str(tmp_path / "mc"), str(tmp_path / "hf"), "--tp", "2")
    decilm = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    with torch.no_grad():
        assert (decilm(TOKENS).logits - ref(TOKENS).logits).abs().max().item() <= 1e-4


def test_bf16_checkpoint_stays_bf16_and_matches_llama(mcore, tmp_path):
    from megatron.core.dist_checkpointing import load_tensors_metadata

    src, ref = _llama(tmp_path, tie=False)
    ref = ref.to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "bf16")
    assert main(["import-hf", str(tmp_path / "bf16"), str(tmp_path / "mc")]) == 0
    saved = load_tensors_metadata(str(tmp_path / "mc"))
    matrices = {k: v.dtype for k, v in saved.items() if len(v.local_shape) == 2}
    assert matrices and set(matrices.values()) == {torch.bfloat16}, matrices
    model = checkpoint.load(tmp_path / "mc")  # fp32 compute on this CPU: converted on load, exactly
    with torch.no_grad():
        theirs = ref.float()(TOKENS).logits
        assert (forward.full_logits(model, TOKENS) - theirs).abs().max().item() <= 1e-4


def test_a_tp_rank_reads_only_its_partition(tmp_path):
    """Each TP rank's tensors come from slices of the file (bytes read = bytes it keeps) and equal the
    rank's chunk of the whole tensors, fused qkv included (a layer with one KV group split over 2 ranks)."""
    from megatron_puzzle.convert.hf_io import open_hf_checkpoint, write_decilm_hf
    from megatron_puzzle.convert.megatron_layout import block_to_megatron

    cfg = every_variant_child()
    w = {k: v.to(torch.bfloat16) for k, v in random_canonical(cfg, seed=5).items()}
    write_decilm_hf(tmp_path / "hf", cfg, w, dtype=torch.bfloat16)
    d = cfg.head_dim
    for rank in (0, 1):
        reader = open_hf_checkpoint(tmp_path / "hf")
        assert reader.dtype == torch.bfloat16
        for i, b in enumerate(cfg.blocks):
            before = reader.bytes_read
            got = block_to_megatron(cfg, i, b, reader, rank, 2)
            assert reader.bytes_read - before == sum(t.numel() * 2 for t in got.values())
            p = f"model.layers.{i}."
            want = {}
            if b.attention.kind == "full":
                kv = b.attention.num_kv_heads
                q, k, v = (w[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
                g = cfg.num_attention_heads // kv
                fused = torch.cat([torch.cat([q[j * g * d:(j + 1) * g * d], k[j * d:(j + 1) * d], v[j * d:(j + 1) * d]])
                                   for j in range(kv)])
                want["self_attention.linear_qkv.weight"] = fused.chunk(2)[rank]
                want["self_attention.linear_proj.weight"] = w[p + "self_attn.o_proj.weight"].chunk(2, dim=1)[rank]
            if b.ffn.kind == "full":
                want["mlp.linear_fc1.weight"] = torch.cat([w[p + f"mlp.{n}_proj.weight"].chunk(2)[rank]
                                                           for n in ("gate", "up")])
                want["mlp.linear_fc2.weight"] = w[p + "mlp.down_proj.weight"].chunk(2, dim=1)[rank]
            for name, t in want.items():
                assert torch.equal(got[name], t), (i, name)
        layers = [t for k, t in w.items() if k.startswith("model.layers.")]
        # half of every layer matrix, and the (replicated) norms whole: never a whole matrix
        assert reader.bytes_read == sum(t.numel() * 2 // (2 if t.dim() == 2 else 1) for t in layers)


def test_stages_load_their_layers_and_write_one_checkpoint(tmp_path, mcore):
    """A tied-embedding child built at PP 2 (2 processes, layers 0-1 | 2-5) and loaded with `load_layers`:
    the checkpoint the stages write together loads at PP 1 as exactly the canonical tensors, and the logits
    run through the stages (the last stage's copy of the tied embedding) equal one process's."""
    from _models import REPO, torchrun
    from megatron_puzzle.convert.megatron_layout import canonical_state

    torchrun(REPO / "tests" / "workers" / "stage_load_worker.py", 2, str(tmp_path))
    cfg = every_variant_child(tie=True)
    want = random_canonical(cfg, seed=0, std=0.15)
    model = checkpoint.load(tmp_path / "ckpt")
    got = canonical_state(model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = forward.logits(model, tokens)
    staged = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert staged.shape == ref.shape and (staged - ref).abs().max().item() <= 1e-5
