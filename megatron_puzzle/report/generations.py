"""Greedy generations of several models from the same prompts, decoded with the parent's tokenizer.

Models are `throughput.runtime_model`s (the DeciLM runtime with real weights), run
one prompt at a time with a KV cache. Without a tokenizer (tiny test models) the
prompt's characters are mapped to token ids and the output is shown as ids.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def encode(tokenizer, prompt: str, vocab_size: int) -> list[int]:
    if tokenizer is None:
        return [ord(c) % vocab_size for c in prompt] or [0]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None else []) + list(ids)


def decode(tokenizer, ids: Sequence[int]) -> str:
    if tokenizer is None:
        return " ".join(str(i) for i in ids)
    return tokenizer.decode(list(ids), skip_special_tokens=True)


@torch.no_grad()
def greedy(model, prompt_ids: Sequence[int], new_tokens: int, eos: int | Sequence[int] | None = None) -> list[int]:
    """The model's greedy continuation (token ids) of one prompt, stopping early at an EOS token."""
    from transformers.cache_utils import DynamicCache

    stop = set([eos] if isinstance(eos, int) else (eos or []))
    device = next(model.parameters()).device
    cache = DynamicCache()
    ids = torch.tensor([list(prompt_ids)], device=device)
    out: list[int] = []
    for _ in range(new_tokens):
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt in stop:
            break
        ids = torch.tensor([[nxt]], device=device)
    return out


def generate_all(models: Mapping[str, torch.nn.Module], prompts: Sequence[str], tokenizer, new_tokens: int,
                 vocab_size: int, eos=None) -> list[dict]:
    """[{"prompt": text, "<model name>": continuation, ...}] for every prompt."""
    rows = []
    for prompt in prompts:
        ids = encode(tokenizer, prompt, vocab_size)
        row = {"prompt": prompt}
        for name, model in models.items():
            row[name] = decode(tokenizer, greedy(model, ids, new_tokens, eos))
        rows.append(row)
    return rows
