"""``ssd``: the Mamba-2 state-space dual scan.

Per head h with group ``h // (H / G)``: ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T`` (state P x N),
``y_t = h_t C_t + D x_t``. That is gated linear attention with q = C, k = B, v = x * dt, log-decay dt * A
and scale 1: the Triton backend is a thin call of :func:`zoo.kernels.chunk_gla`; the torch backend
(``chunked.py``) shares each group's B and C across its heads instead of repeating them.

``chunk_size`` is the chunk of the Triton/CUDA kernels and the largest the torch path uses: on CPU the torch path
picks its own chunk at or below it (:func:`torch_chunk`), since its cost per token is about ``c`` (the intra-chunk
``c x c`` decay and score matrices) plus ``n p / c`` (one ``(n, p)`` state per chunk and head), least near
``c = sqrt(n p)``. Chunking is an exact reformulation: only rounding changes with the chunk.
"""

from __future__ import annotations

import math

import torch

from zoo.kernels._dispatch import resolve_backend
from zoo.kernels.gla import chunk_gla
from zoo.kernels.ssd_scan.chunked import ssd_chunked
from zoo.packing import validate_cu_seqlens
from zoo.parallel import sequence

__all__ = ["ssd", "torch_chunk"]


def torch_chunk(chunk_size: int, d_state: int, headdim: int, length: int) -> int:
    """The chunk the torch path runs: the power of two nearest ``0.8 sqrt(d_state * headdim)`` (measured best on CPU,
    e.g. 64 at Mamba-2's d_state 128, headdim 64, where it is 2.3x faster fwd+bwd than 256), within [16, 128], at
    most ``chunk_size`` and never above the sequence length."""
    best = 2 ** round(math.log2(max(0.8 * math.sqrt(d_state * headdim), 1.0)))
    return max(1, min(chunk_size, max(16, min(best, 128)), max(length, 1)))


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 SSD in Mamba-2 layout.

    x ``(b, l, h, p)``, dt ``(b, l, h)`` (already softplus'ed and biased), A ``(h,)`` negative,
    B, C ``(b, l, g, n)`` with g dividing h, D ``(h,)`` or None; initial_state ``(b, h, p, n)``
    (``(N, h, p, n)`` with ``cu_seqlens``). Returns y ``(b, l, h, p)`` in x's dtype, and with
    ``return_final_state`` also the final state ``(b|N, h, p, n)`` in float32.
    """
    if x.dim() != 4:
        raise ValueError(f"ssd: x must be (batch, length, heads, headdim); got {tuple(x.shape)}.")
    b, l, h, p = x.shape
    if tuple(dt.shape) != (b, l, h):
        raise ValueError(f"ssd: dt must be ({b}, {l}, {h}) like x's first three dims; got {tuple(dt.shape)}.")
    if tuple(A.shape) != (h,):
        raise ValueError(f"ssd: A must be ({h},), one negative scalar per head; got {tuple(A.shape)}.")
    if B.dim() != 4 or B.shape != C.shape or B.shape[:2] != (b, l):
        raise ValueError(f"ssd: B and C must both be ({b}, {l}, ngroups, d_state); got {tuple(B.shape)} and {tuple(C.shape)}.")
    groups = B.shape[2]
    if h % groups:
        raise ValueError(f"ssd: ngroups {groups} must divide the number of heads {h}.")
    if D is not None and tuple(D.shape) != (h,):
        raise ValueError(f"ssd: D must be ({h},) or None; got {tuple(D.shape)}.")
    n_seq = b if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (n_seq, h, p, B.shape[-1]):
        raise ValueError(
            f"ssd: initial_state must be ({n_seq}, {h}, {p}, {B.shape[-1]}) (batch|sequences, heads, headdim, d_state); "
            f"got {tuple(initial_state.shape)}."
        )
    # The grouped torch path; under sequence parallelism the chunk_gla form below runs (it is routed to LASP-2).
    if backend in (None, "torch") and sequence.active() is None and resolve_backend(backend, x, op="ssd") == "torch":
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}.")
        if cu_seqlens is not None:
            validate_cu_seqlens(cu_seqlens, l, op="ssd", batch=b)
        c = torch_chunk(chunk_size, B.shape[-1], p, l)
        y, final = ssd_chunked(x, dt, A, B, C, chunk_size=c, initial_state=initial_state, cu_seqlens=cu_seqlens)
        y = y.to(x.dtype)
        if D is not None:
            y = y + x * D[:, None].to(x.dtype)
        return (y, final) if return_final_state else y
    rep = h // groups
    q = C.repeat_interleave(rep, dim=2)  # (b, l, h, n)
    k = B.repeat_interleave(rep, dim=2)  # (b, l, h, n)
    v = x * dt[..., None].to(x.dtype)  # (b, l, h, p)
    ct = torch.promote_types(dt.dtype, torch.float32)
    g = dt.to(ct) * A.to(ct)  # (b, l, h) log-decay
    h0 = initial_state.transpose(-1, -2) if initial_state is not None else None  # (b, h, n, p)
    y, final = chunk_gla(
        q, k, v, g, scale=1.0, initial_state=h0, output_final_state=return_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend,
    )
    if D is not None:
        y = y + x * D[:, None].to(x.dtype)
    if return_final_state:
        return y, final.transpose(-1, -2)  # (b, h, p, n)
    return y
