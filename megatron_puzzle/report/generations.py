"""Greedy generations of several models from the same prompts, decoded with the parent's tokenizer.

Models are `cost.decilm_runtime.runtime_model`s (the DeciLM runtime with real weights), run
one prompt at a time with a KV cache. Without a tokenizer (tiny test models) the
prompt's characters are mapped to token ids and the output is shown as ids.

A looping model shows in `repetition`: the share of its continuations' 3-grams that
already occurred earlier in the same continuation (0 for text that never repeats a
3-gram, near 1 for "of the city of the city of the city ...").
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


def repeated_ngrams(ids: Sequence[int], n: int = 3) -> tuple[int, int]:
    """(repeated, total): how many of the n-grams of `ids` occurred earlier in `ids`, of how many."""
    from ..model.losses import repeating

    return sum(repeating(list(ids), n)), max(0, len(ids) - n + 1)


def repetition(continuations: Sequence[Sequence[int]], n: int = 3) -> float:
    """Share of repeated n-grams over all continuations, each counted on its own (nan without n-grams)."""
    counts = [repeated_ngrams(c, n) for c in continuations]
    total = sum(t for _, t in counts)
    return sum(r for r, _ in counts) / total if total else float("nan")


def generate_all(models: Mapping[str, torch.nn.Module], prompts: Sequence[str], tokenizer, new_tokens: int,
                 vocab_size: int, eos=None) -> tuple[list[dict], dict[str, float]]:
    """([{"prompt": text, "<model name>": continuation, ...}] for every prompt, {model name: repetition})."""
    rows, ids_of = [], {name: [] for name in models}
    for prompt in prompts:
        ids = encode(tokenizer, prompt, vocab_size)
        row = {"prompt": prompt}
        for name, model in models.items():
            out = greedy(model, ids, new_tokens, eos)
            ids_of[name].append(out)
            row[name] = decode(tokenizer, out)
        rows.append(row)
    return rows, {name: repetition(c) for name, c in ids_of.items()}
