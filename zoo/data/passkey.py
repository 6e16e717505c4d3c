"""Passkey retrieval (Mohtashami & Jaggi 2023): a number hidden at some depth in long filler text.

The model reads ``filler ... The pass key is 71432. Remember it. 71432 is the pass key. ... filler``
and is asked ``What is the pass key? The pass key is``; it must continue with the digits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeyExample:
    input_ids: torch.Tensor  # (L,) the prompt, exactly the requested length
    answer_ids: torch.Tensor  # (n_digits,) the tokens of " 71432"
    passkey: str
    depth: float


def make_passkey_example(tokenizer, length: int, depth: float, rng: random.Random, n_digits: int = 5) -> PasskeyExample:
    """One prompt of exactly ``length`` tokens with the key at relative ``depth`` in [0, 1]."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must lie in [0, 1], got {depth}.")
    key = str(rng.randrange(10 ** (n_digits - 1), 10**n_digits))
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = enc(" " + QUESTION)
    unit = enc(FILLER)
    budget = length - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"passkey length {length} is too short for the needle and question ({len(needle) + len(question)} tokens).")
    filler = (unit * (budget // max(len(unit), 1) + 1))[:budget]
    cut = int(round(depth * budget))
    ids = filler[:cut] + needle + filler[cut:] + question
    return PasskeyExample(torch.tensor(ids), torch.tensor(enc(" " + key)), key, depth)


@torch.no_grad()
def evaluate_passkey(
    model,
    tokenizer,
    lengths: list[int],
    *,
    n_per_length: int = 5,
    depths: list[float] | None = None,
    prefill_chunk_size: int | None = 2048,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Greedy passkey retrieval accuracy per prompt length; long prompts are prefilled in chunks."""
    rng = random.Random(seed)
    depths = depths or [i / max(n_per_length - 1, 1) for i in range(n_per_length)]
    device = next(model.parameters()).device
    rows = []
    for length in lengths:
        hits = 0
        examples = [make_passkey_example(tokenizer, length, depths[i % len(depths)], rng) for i in range(n_per_length)]
        for ex in tqdm(examples, desc=f"passkey L={length}", disable=not progress, leave=False):
            kw = {"prefill_chunk_size": prefill_chunk_size} if prefill_chunk_size and length > prefill_chunk_size else {}
            out = model.generate(
                ex.input_ids[None].to(device), max_new_tokens=len(ex.answer_ids), do_sample=False,
                pad_token_id=tokenizer.pad_token_id, **kw,
            )
            hits += int(torch.equal(out[0, length:].cpu(), ex.answer_ids))
        rows.append({"length": length, "accuracy": hits / n_per_length, "n": n_per_length})
    return rows
