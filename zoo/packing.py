"""Packed documents: the one home of ``cu_seqlens`` for kernels, layers, mixers and models.

Several documents packed into one row of ``T`` tokens are described by ``cu_seqlens (N + 1,)``: integer,
``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == T``, non-decreasing. Document ``n`` is tokens
``[cu_seqlens[n], cu_seqlens[n + 1])``; no information crosses a document boundary.

**The rule for empty documents** (``cu_seqlens[n] == cu_seqlens[n + 1]``): they are accepted everywhere. An
empty document has no tokens, so it changes no output; where a kernel returns one final state per document,
an empty document's final state is its initial state (zeros when none is given). Every kernel's test checks
that packing with empty documents equals packing without them.

:func:`validate_cu_seqlens` is the one validator (every kernel and layer calls it); the helpers below
(token -> document, position in document, starts, padded layout, conv state) are the one implementation of
each packing computation. :func:`packed_cu_seqlens` turns every description a caller may pass to a model
(``cu_seqlens``, HF's ``cu_seq_lens_q/k``, ``seq_idx``, restarting ``position_ids``) into one ``cu_seqlens``.
This module depends on torch only, so kernels import it without importing the rest of the zoo.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "check", "validate_cu_seqlens", "seq_ids", "seq_index", "seq_lengths", "sequence_starts", "count_ids",
    "packed_index", "to_padded_batch", "from_padded_batch", "last_inputs", "packed_cu_seqlens", "PACKING_KWARGS",
]

# Keyword arguments that describe packing, as HF collators and trainers pass them to a model's forward.
PACKING_KWARGS = ("cu_seqlens", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def check(cond: torch.Tensor, message: str, detail: Callable[[], str] | None = None) -> None:
    """Raise ``ValueError`` unless the 0-d bool tensor ``cond`` is true.

    Eagerly the error is ``message`` followed by ``detail()`` (which may read tensor values). Under
    ``torch.compile`` the check is an in-graph assertion (``torch._assert_async``: a RuntimeError with ``message``)
    instead of a Python branch on tensor data, so it costs no graph break and no specialisation.
    """
    if torch.compiler.is_compiling():
        torch._assert_async(cond, message)
    elif not bool(cond):
        raise ValueError(message + (detail() if detail is not None else ""))


def validate_cu_seqlens(cu_seqlens: torch.Tensor, total: int, *, op: str = "cu_seqlens", batch: int = 1) -> torch.Tensor:
    """Check ``cu_seqlens`` against a packed row of ``total`` tokens; returns it as int64.

    ``op`` names the caller in the message (a kernel's name); ``batch`` is the caller's batch size, which must be
    1 (packing flattens documents into one row). Empty documents are allowed (see the module docstring).
    """
    if batch != 1:
        raise ValueError(f"{op}: packed input (cu_seqlens) must have batch size 1, got {batch}; concatenate the documents into one row.")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or (
        cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool
    ):
        shape = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"{op}: cu_seqlens must be a 1-D integer tensor (N + 1,) of cumulative document lengths; got {shape}.")
    cu = cu_seqlens.long()
    check(
        (cu[0] == 0) & (cu[-1] == total) & (cu[1:] >= cu[:-1]).all(),
        f"{op}: cu_seqlens must rise from 0 to the number of packed tokens ({total}) without decreasing; fix the cumulative lengths.",
        lambda: f" Got {cu.tolist()}.",
    )
    return cu


def seq_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Length of every document, ``(N,)`` int64."""
    cu = cu_seqlens.long()
    return cu[1:] - cu[:-1]


def seq_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Index of the document every packed token belongs to, ``(total,)`` int64."""
    cu = validate_cu_seqlens(cu_seqlens, total)
    return torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1], output_size=total)


def seq_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every packed token inside its own document, ``(total,)`` int64."""
    cu = validate_cu_seqlens(cu_seqlens, total)
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=total)
    return torch.arange(total, device=cu.device) - starts


def sequence_starts(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``(total,)`` bool, True at the first token of every (non-empty) document."""
    return seq_index(cu_seqlens, total) == 0


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """``torch.bincount(ids, minlength=n)`` for ids in ``[0, n)``, with a static ``(n,)`` shape (compiles)."""
    return torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(0, ids.long(), torch.ones_like(ids, dtype=torch.long))


def packed_index(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For each packed token: its document and its position there; and the longest document's length."""
    cu = cu_seqlens.long()
    total = int(cu[-1])
    lens = cu[1:] - cu[:-1]
    seq = seq_ids(cu, total)
    return seq, torch.arange(total, device=cu.device) - cu[:-1][seq], int(lens.max()) if lens.numel() else 0


def to_padded_batch(x: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, n: int, lmax: int) -> torch.Tensor:
    """``x (1, T, ...)`` packed -> ``(n, lmax, ...)`` zero-padded on the right; undo with :func:`from_padded_batch`.

    Right padding with zeros leaves the final state of a linear recurrence unchanged when a zero input is an
    identity step (log-decay 0, key 0), which is why kernels may run packed documents as this batch.
    """
    return x.new_zeros(n, lmax, *x.shape[2:]).index_put((seq, pos), x[0])


def from_padded_batch(y: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``(n, lmax, ...)`` -> the packed ``(1, T, ...)`` row (inverse of :func:`to_padded_batch`)."""
    return y[seq, pos][None]


def last_inputs(
    x: torch.Tensor,
    width: int,
    *,
    prev: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Conv state after ``x (B, L, E)``: the last ``width`` real inputs as ``(B|N, E, width)``, zeros in front.

    ``prev (B, E, width)`` is the carried-in state (the inputs before x); ``mask (B, L)`` (1 = real token) skips
    padded tokens; with ``cu_seqlens`` (B == 1) one state per packed document, none reaching across a document
    start (an empty document's state is zeros).
    """
    B, L, E = x.shape
    if width == 0:
        return x.new_zeros(B if cu_seqlens is None else cu_seqlens.numel() - 1, E, 0)
    if cu_seqlens is not None:
        cu = validate_cu_seqlens(cu_seqlens, L, batch=B)
        idx = cu[1:, None] - width + torch.arange(width, device=x.device)  # (N, width)
        valid = idx >= cu[:-1, None]
        out = x[0][idx.clamp(min=0)] * valid[..., None].to(x.dtype)  # (N, width, E)
        return out.transpose(1, 2)
    full = torch.cat([prev.to(x.dtype) if prev is not None else x.new_zeros(B, E, width), x.transpose(1, 2)], dim=-1)
    if mask is None:
        return full[..., full.shape[-1] - width :]
    keep = torch.cat([torch.ones(B, width, dtype=torch.bool, device=x.device), mask.bool()], dim=1)
    # A stable sort puts the real inputs last, in their order; the last ``width`` of them are the state.
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, keep.shape[1] - width :]
    return torch.gather(full, 2, order[:, None, :].expand(B, E, width))


# --- a model's packing arguments -> one cu_seqlens -------------------------------------------------------------


def _starts_to_cu(starts: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` bool document starts (row starts included) -> int32 cu_seqlens over the flattened rows."""
    flat = starts.reshape(-1)
    idx = torch.nonzero(flat).flatten()
    return torch.cat([idx, idx.new_tensor([flat.numel()])]).to(torch.int32)


def _restarts(ids: torch.Tensor, *, consecutive: bool) -> torch.Tensor:
    """``(B, L)`` bool: True where a new document starts (column 0 always)."""
    step = ids[:, 1:] - ids[:, :-1]
    brk = step != 1 if consecutive else step != 0
    return torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool), brk], dim=1)


def packed_cu_seqlens(
    batch: int,
    length: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    seq_idx: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The packing of a ``(batch, length)`` model input as ``cu_seqlens`` over its flattened tokens, or None.

    ``cu_seqlens`` / ``cu_seq_lens_q`` (with ``cu_seq_lens_k`` equal to it) describe one packed row (batch 1).
    ``position_ids`` pack when they restart inside a row (a step other than +1); ``seq_idx`` (document index per
    token) packs where it changes. Row starts are document starts, so several packed rows flatten into one.
    ``attention_mask`` is the padding mask (None when there is no padding): with padding, position ids must be
    consecutive over the real tokens, since packing and padding together are refused. An explicit ``cu_seqlens``
    is returned as given; a derived one is int32. Ordinary position ids (consecutive in every row, as
    ``generate()`` passes them) are not packing.
    """
    total = batch * length
    if cu_seq_lens_k is not None:
        if cu_seq_lens_q is None:
            raise ValueError("cu_seq_lens_k was given without cu_seq_lens_q; pass both (equal) or neither.")
        if not torch.equal(cu_seq_lens_k.to(cu_seq_lens_q.device, torch.int64), cu_seq_lens_q.to(torch.int64)):
            raise ValueError("cu_seq_lens_k differs from cu_seq_lens_q; zoo models pack self-attention only, so they must be equal.")
    if max_length_q is not None and max_length_k is not None and int(max_length_q) != int(max_length_k):
        raise ValueError(f"max_length_q={max_length_q} differs from max_length_k={max_length_k}; they must be equal.")
    for name, cu in (("cu_seqlens", cu_seqlens), ("cu_seq_lens_q", cu_seq_lens_q)):
        if cu is not None and batch != 1:
            raise ValueError(f"{name} packs sequences into one row; got batch size {batch}, expected 1.")
    if torch.compiler.is_compiling() and all(v is None for v in (position_ids, cu_seq_lens_q, seq_idx)):
        return cu_seqlens  # value checks would break the graph; the kernels assert in-graph
    given: list[tuple[str, torch.Tensor]] = []  # (name, int64 cu_seqlens over the flattened tokens)
    for name, cu in (("cu_seqlens", cu_seqlens), ("cu_seq_lens_q", cu_seq_lens_q)):
        if cu is not None:
            given.append((name, validate_cu_seqlens(cu, total, op=name)))
    if max_length_q is not None and given:
        cu = given[0][1]
        longest = int((cu[1:] - cu[:-1]).max())
        if int(max_length_q) != longest:
            raise ValueError(f"max_length_q={max_length_q} but the longest packed document has {longest} tokens.")
    for name, ids, consecutive in (("position_ids", position_ids, True), ("seq_idx", seq_idx, False)):
        if ids is None or length == 1:
            continue  # a single token per row (decoding) is never packed
        ids = ids.reshape(-1, ids.shape[-1])
        ids = ids.expand(batch, -1) if ids.shape[0] == 1 else ids
        if ids.shape != (batch, length):
            raise ValueError(f"{name} has shape {tuple(ids.shape)}; expected ({batch}, {length}) like input_ids.")
        starts = _restarts(ids.long(), consecutive=consecutive)
        if attention_mask is not None:
            real = attention_mask[:, -length:].bool()
            if bool((starts[:, 1:] & real[:, 1:] & real[:, :-1]).any()):
                raise ValueError(
                    f"{name} restart inside a padded batch (attention_mask has zeros); packing and padding together are "
                    "not supported: pack documents without padding (as DataCollatorWithFlattening does) or pad without packing."
                )
            continue  # consecutive over the real tokens: ordinary positions of a padded batch
        given.append((name, _starts_to_cu(starts).to(torch.int64)))
    if not given:
        return None
    name0, cu0 = given[0]
    for name, cu in given[1:]:
        if not torch.equal(cu.to(cu0.device), cu0):
            raise ValueError(
                f"{name0} {cu0.tolist()} and {name} {cu.tolist()} describe different packed documents; pass one of them."
            )
    if cu_seqlens is not None:
        return cu_seqlens  # as given (its dtype is the caller's choice)
    if cu0.numel() == batch + 1:
        return None  # one document per row: not packed
    return cu0.to(torch.int32)
