"""The oracle for ``linear_scan``: the plain sequential recurrence ``h_t = a_t * h_{t-1} + b_t``."""

from __future__ import annotations

import torch

from zoo.kernels._dispatch import compute_dtype


def linear_scan_ref(
    a: torch.Tensor,
    b: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential loop over time (float64 capable, differentiable by autograd).

    a, b ``(B, L, D)``; h0 ``(B, D)`` (or ``(N, D)`` with ``cu_seqlens`` and B == 1).
    Returns h ``(B, L, D)`` and the state after the last step, ``(B, D)`` or ``(N, D)``,
    both in ``a``'s dtype. ``reverse`` runs from the end: ``h_t = a_t * h_{t+1} + b_t``.
    """
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs, lasts = [], []
        for n in range(len(bounds) - 1):
            s, e = bounds[n], bounds[n + 1]
            h, last = linear_scan_ref(a[:, s:e], b[:, s:e], None if h0 is None else h0[n : n + 1], reverse=reverse)
            outs.append(h)
            lasts.append(last)
        return torch.cat(outs, dim=1), torch.cat(lasts, dim=0)
    dtype = compute_dtype(a.dtype)
    B, L, D = a.shape
    h = a.new_zeros(B, D, dtype=dtype) if h0 is None else h0.to(dtype)
    steps = list(zip(a.to(dtype).unbind(1), b.to(dtype).unbind(1)))
    out = []
    for a_t, b_t in reversed(steps) if reverse else steps:
        h = a_t * h + b_t
        out.append(h)
    if reverse:
        out.reverse()
    return torch.stack(out, dim=1).to(a.dtype), h.to(a.dtype)  # (B, L, D), (B, D)
