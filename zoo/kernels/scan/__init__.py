"""``linear_scan``: the elementwise linear recurrence ``h_t = a_t * h_{t-1} + b_t`` behind minGRU, HGRN, GateLoop.

Backends: ``"torch"`` (blocked scan, :mod:`.chunked`), ``"triton"`` (:mod:`.triton`); the oracle is
:func:`.reference.linear_scan_ref`.
"""

from __future__ import annotations

import torch

from zoo.kernels._dispatch import resolve_backend
from zoo.kernels.scan.chunked import linear_scan_chunked
from zoo.packing import seq_lengths, validate_cu_seqlens
from zoo.parallel import sequence

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)

__all__ = ["linear_scan", "pad_identity"]


def pad_identity(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn padded steps into identities (``a = 1``, ``b = 0``); ``mask (B, L)`` is 1 for real tokens."""
    if mask is None:
        return a, b
    keep = mask.bool().reshape(*mask.shape, *([1] * (a.dim() - 2)))  # (B, L, 1, ...)
    return torch.where(keep, a, torch.ones_like(a)), torch.where(keep, b, torch.zeros_like(b))


def _check(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> None:
    if a.dim() != 3 or b.dim() != 3:
        raise ValueError(f"linear_scan: a and b must be (B, L, D); got shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.shape != b.shape:
        raise ValueError(f"linear_scan: a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape; broadcast them first.")
    if a.dtype != b.dtype:
        raise ValueError(f"linear_scan: a is {a.dtype} but b is {b.dtype}; cast both to one dtype.")
    if a.dtype not in _DTYPES:
        raise ValueError(f"linear_scan: dtype {a.dtype} is not supported; use one of {', '.join(map(str, _DTYPES))}.")
    if a.device != b.device:
        raise ValueError(f"linear_scan: a is on {a.device} but b is on {b.device}; move them to one device.")
    if a.shape[1] == 0:
        raise ValueError("linear_scan: the sequences are empty (L == 0); pass at least one time step.")
    B, L, D = a.shape
    rows = B
    if cu_seqlens is not None:
        validate_cu_seqlens(cu_seqlens, L, op="linear_scan", batch=B)
        rows = cu_seqlens.numel() - 1
    if h0 is not None:
        if h0.shape != (rows, D):
            what = "(N, D) with N sequences in cu_seqlens" if cu_seqlens is not None else "(B, D)"
            raise ValueError(f"linear_scan: h0 must be {what} = {(rows, D)}, got {tuple(h0.shape)}.")
        if h0.device != a.device:
            raise ValueError(f"linear_scan: h0 is on {h0.device} but a is on {a.device}; move it to a's device.")
        if h0.is_complex() and not a.is_complex():
            raise ValueError("linear_scan: h0 is complex but a and b are real; pass complex a and b or a real h0.")


def linear_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise linear recurrence over dim 1: ``h_t = a_t * h_{t-1} + b_t`` (``h_{-1} = h0`` or 0).

    a, b ``(B, L, D)``, real or complex, same dtype; h0 ``(B, D)``, or ``(N, D)`` when ``cu_seqlens``
    ``(N + 1,)`` packs N sequences into one row (B == 1; the state restarts from ``h0[n]`` at each sequence).
    ``reverse`` scans from the end (``h_t = a_t * h_{t+1} + b_t``). Half-precision inputs are accumulated in
    float32. Returns ``h`` ``(B, L, D)`` and the final state ``(B, D)`` (``(N, D)`` when packed), in a's dtype.
    Differentiable in a, b and h0 on every backend.
    """
    _check(a, b, h0, cu_seqlens)
    if (shard := sequence.active()) is not None:  # one sequence split across ranks
        from zoo.parallel.kernels import linear_scan_sp

        return linear_scan_sp(a, b, h0, reverse=reverse, cu_seqlens=cu_seqlens, backend=backend, shard=shard)
    backend = resolve_backend(backend, a, op="linear_scan")
    if cu_seqlens is not None and not torch.compiler.is_compiling():
        nonempty = seq_lengths(cu_seqlens) > 0
        if not bool(nonempty.all()):  # empty documents: scan the others; an empty one's final state is its h0
            cu = cu_seqlens.long()
            kept = torch.nonzero(nonempty).flatten()
            h, last = linear_scan(a, b, None if h0 is None else h0[kept], reverse=reverse,
                                  cu_seqlens=torch.cat([cu[:1], cu[1:][nonempty]]), backend=backend)
            base = h0.to(last.dtype) if h0 is not None else last.new_zeros(cu.numel() - 1, last.shape[-1])
            return h, base.index_copy(0, kept, last)
    if backend == "triton":
        from zoo.kernels.scan.triton import linear_scan_triton

        return linear_scan_triton(a, b, h0, reverse=reverse, cu_seqlens=cu_seqlens)
    return linear_scan_chunked(a, b, h0, reverse=reverse, cu_seqlens=cu_seqlens)
