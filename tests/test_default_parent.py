"""The default parent, SmolLM2-135M-Instruct from its GGUF file, imported into Megatron-Core."""

import pytest
import torch

from megatron_puzzle.convert.hf_io import default_parent_path, load_tokenizer, read_hf_checkpoint
from megatron_puzzle.convert.megatron_layout import load_canonical
from megatron_puzzle.model import forward
from megatron_puzzle.model.gpt import build_model


@pytest.fixture(scope="module")
def parent():
    path = default_parent_path()
    cfg, tensors = read_hf_checkpoint(path)
    return path, cfg, tensors


def _real_text_tokens(tok, n):
    from megatron_puzzle.data import default_sample_path

    text = default_sample_path().read_text()[20000:60000]
    return torch.tensor(tok(text)["input_ids"][:n])


def test_default_parent_matches_transformers_on_real_text(mcore, parent):
    from transformers import AutoModelForCausalLM

    path, cfg, tensors = parent
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (1536, 49152, True)
    model = build_model(cfg)
    load_canonical(model, tensors)
    tok = load_tokenizer(path)
    ids = _real_text_tokens(tok, 2 * 96).view(2, 96)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = forward.full_logits(model, ids)
        theirs = ref(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-3
    # a TP rank's slices of the GGUF (Q/K un-permuted head by head) equal transformers' whole-file load
    from megatron_puzzle.convert.hf_io import open_hf_checkpoint

    reader, sd = open_hf_checkpoint(path), ref.state_dict()
    for n in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        name = f"model.layers.7.{n}.weight"
        rows, cols = reader.shape(name)
        assert torch.equal(reader.read(name, 0, rows // 3, rows // 2), sd[name][rows // 3: rows // 2])
        assert torch.equal(reader.read(name, 1, cols // 4, cols // 2), sd[name][:, cols // 4: cols // 2])

    # held-out loss on real English is far below that on the same tokens shuffled
    def loss(x):
        with torch.no_grad():
            lg = forward.full_logits(model, x)
        return torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1)).item()

    shuffled = ids.flatten()[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))].view_as(ids)
    real, rand = loss(ids), loss(shuffled)
    assert real < 4.0 and rand - real > 3.0, (real, rand)
