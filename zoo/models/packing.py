"""Packed documents, however the caller describes them: ``cu_seqlens``, HF's ``cu_seq_lens_q/k``, ``seq_idx``
or ``position_ids`` that restart (``DataCollatorWithFlattening``, TRL-style packing).

Every description is turned into one ``cu_seqlens`` over the flattened ``(1, B * L)`` tokens; when several are
given they must agree. Ordinary position ids (consecutive in every row, as ``generate()`` passes them) are not
packing.
"""

from __future__ import annotations

import torch


def _starts_to_cu(starts: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` bool document starts (row starts included) -> int32 cu_seqlens over the flattened rows."""
    flat = starts.reshape(-1)
    idx = torch.nonzero(flat).flatten()
    return torch.cat([idx, idx.new_tensor([flat.numel()])]).to(torch.int32)


def _check_cu(cu: torch.Tensor, total: int, name: str) -> torch.Tensor:
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor of cumulative document starts [0, ..., total]; got shape {tuple(cu.shape)}.")
    cu = cu.to(torch.int64)
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"{name} must rise from 0 to the number of packed tokens ({total}); got {cu.tolist()}."
        )
    return cu


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
    """The packing of a ``(batch, length)`` input as ``cu_seqlens`` over its flattened tokens, or None if unpacked.

    ``cu_seqlens`` / ``cu_seq_lens_q`` (with ``cu_seq_lens_k`` equal to it) describe one packed row (batch 1).
    ``position_ids`` pack when they restart inside a row (a step other than +1); ``seq_idx`` (document index per
    token) packs where it changes. Row starts are document starts, so several packed rows flatten into one.
    ``attention_mask`` is the padding mask (None when there is no padding): with padding, position ids must be
    consecutive over the real tokens, since packing and padding together are refused. An explicit ``cu_seqlens``
    is returned as given; a derived one is int32.
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
        return cu_seqlens  # value checks would break the graph; eager runs make them
    given: list[tuple[str, torch.Tensor]] = []  # (name, int64 cu_seqlens over the flattened tokens)
    for name, cu in (("cu_seqlens", cu_seqlens), ("cu_seq_lens_q", cu_seq_lens_q)):
        if cu is not None:
            given.append((name, _check_cu(cu, total, name)))
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
