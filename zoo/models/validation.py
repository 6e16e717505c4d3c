"""Cheap checks of what a caller hands to a zoo model's ``forward``, each failing with one sentence and the fix.

Shape checks always run; value checks (token ids and labels inside the vocabulary) need one host sync each and
are skipped while ``torch.compile`` traces, so they never break the graph (eager runs make them). A few ids (a
decode step) are checked on the host from one small copy, with no tensor reductions: the check stays, its cost
per generated token is about a microsecond.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
#: Up to this many ids are range-checked on the host (one copy, no reduction ops); more use one fused reduction.
HOST_CHECK_MAX = 64


def _range_error(name: str, t: torch.Tensor, vocab: int, allowed: str) -> None:
    lo, hi = int(t.min()), int(t.max())
    raise ValueError(
        f"{name} holds ids from {lo} to {hi}, outside the vocabulary [0, {vocab}) of this model (vocab_size={vocab}){allowed}; "
        "tokenize with the model's tokenizer or build the model with a larger vocab_size."
    )


def check_inputs(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, vocab_size: int) -> None:
    """``input_ids`` (batch, length) of ids in ``[0, vocab_size)``, or ``inputs_embeds`` (batch, length, d_model)."""
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be 2-D (batch, length); got shape {tuple(input_ids.shape)}"
                + ("; add a batch dimension, e.g. input_ids[None]." if input_ids.dim() == 1 else ".")
            )
        if input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(f"input_ids must be integer token ids; got dtype {input_ids.dtype}; pass a LongTensor.")
        shape = input_ids.shape
    else:
        if inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must be 3-D (batch, length, d_model); got shape {tuple(inputs_embeds.shape)}.")
        shape = inputs_embeds.shape
    if shape[0] == 0:
        raise ValueError("the batch is empty (batch size 0); pass at least one sequence.")
    if input_ids is not None and input_ids.numel() and not torch.compiler.is_compiling():
        if input_ids.numel() <= HOST_CHECK_MAX:
            ids = input_ids.flatten().tolist()
            lo, hi = min(ids), max(ids)
        else:
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()
        if lo < 0 or hi >= vocab_size:
            _range_error("input_ids", input_ids, vocab_size, "")


def check_labels(labels: torch.Tensor | None, vocab_size: int) -> None:
    """Language-model labels: ids in ``[0, vocab_size)`` or -100 (ignored)."""
    if labels is None or not labels.numel() or torch.compiler.is_compiling():
        return
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != IGNORE_INDEX)
    if bool(bad.any()):
        _range_error("labels", labels[bad], vocab_size, f" (only {IGNORE_INDEX} is allowed outside it, to ignore a position)")
