"""Perplexity of a zoo causal LM on a local text file (txt / json / jsonl / csv / parquet)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    *,
    seq_len: int = 1024,
    batch_size: int = 8,
    text_column: str = "text",
    progress: bool = True,
) -> dict[str, float]:
    """Token-level perplexity over the whole file.

    The documents are joined into one stream (each followed by eos) and cut into disjoint blocks of ``seq_len``
    tokens; inside a block every token after the first is scored. Returns ``tokens`` (scored), ``nll`` (mean
    negative log-likelihood, nats), ``perplexity`` and ``bits_per_token``.
    """
    from zoo.data.text import read_texts, tokenize_texts

    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 to score anything (got {seq_len}).")
    ids = torch.as_tensor(tokenize_texts(read_texts(str(path), text_column, key="perplexity file"), tokenizer))
    if ids.numel() < 2:
        raise ValueError(f"{path}: the file holds fewer than 2 tokens; give a file with some text.")
    if int(ids.max()) >= model.config.vocab_size:
        raise ValueError(
            f"the tokenizer produces id {int(ids.max())} but the model's vocabulary has {model.config.vocab_size}; "
            "use the tokenizer the model was trained with."
        )
    blocks = list(ids.split(seq_len))
    blocks = [b for b in blocks if b.numel() >= 2]
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for s in tqdm(range(0, len(blocks), batch_size), desc="perplexity", disable=not progress, dynamic_ncols=True):
        group = blocks[s : s + batch_size]
        T = max(b.numel() for b in group)
        x = torch.zeros(len(group), T, dtype=torch.long)
        mask = torch.zeros(len(group), T, dtype=torch.long)
        for j, b in enumerate(group):
            x[j, : b.numel()], mask[j, : b.numel()] = b, 1
        x, mask = x.to(device), mask.to(device)
        logits = model(input_ids=x, attention_mask=mask).logits.float()
        tgt = x[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                              reduction="sum")
        total += float(nll)
        count += int((tgt != -100).sum())
    mean = total / count
    return {"tokens": count, "nll": mean, "perplexity": math.exp(mean), "bits_per_token": mean / math.log(2)}
