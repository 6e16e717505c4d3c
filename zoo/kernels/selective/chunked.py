"""Chunked selective scan in pure torch: the fast path on CPU.

Time is cut into chunks of ``chunk_size``; inside a chunk the linear recurrence ``h_t = a_t h_{t-1} + b_t``
runs as a work-efficient (Blelloch-style, odd/even) parallel scan, across chunks the ``(B, E, N)`` state is
carried by a Python loop over chunks only. A custom autograd function keeps memory bounded: the forward
stores the state only at chunk starts, the backward recomputes each chunk's states and runs the reverse
scan ``g_t = C_t dy_t + a_{t+1} g_{t+1}``. No ``(B, L, E, N)`` tensor is ever built for the whole sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.kernels._dispatch import compute_dtype
from zoo.packing import sequence_starts


def grouped(BC: torch.Tensor) -> torch.Tensor:
    """``(B, N, L)`` -> ``(B, 1, N, L)``; ``(B, G, N, L)`` unchanged."""
    return BC[:, None] if BC.dim() == 3 else BC


def _addcmul_into(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = x + a * s`` in place; under ``torch.compile`` as a copy (Dynamo cannot trace ``out=`` into a strided view)."""
    if torch.compiler.is_compiling():
        return out.copy_(torch.addcmul(x, a, s))
    return torch.addcmul(x, a, s, out=out)


def _scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inclusive ``h_t = a_t h_{t-1} + b_t`` along dim 1 (``h_{-1} = 0``); dim 1 is a power of two."""
    if a.shape[1] == 1:
        return b
    a0, a1, b0, b1 = a[:, 0::2], a[:, 1::2], b[:, 0::2], b[:, 1::2]
    odd = _scan(a1 * a0, torch.addcmul(b1, a1, b0))  # states at t = 1, 3, 5, ...
    h = torch.empty_like(b)
    h[:, 1::2] = odd
    h[:, 0] = b[:, 0]
    _addcmul_into(b0[:, 1:], a0[:, 1:], odd[:, :-1], h[:, 2::2])
    return h


def _reverse_scan(c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``g_t = s_t + c_t g_{t+1}`` along dim 1 (``g_T = 0``); dim 1 is a power of two."""
    if c.shape[1] == 1:
        return s
    c0, c1, s0, s1 = c[:, 0::2], c[:, 1::2], s[:, 0::2], s[:, 1::2]
    even = _reverse_scan(c0 * c1, torch.addcmul(s0, c0, s1))  # g at t = 0, 2, 4, ...
    g = torch.empty_like(s)
    g[:, 0::2] = even
    g[:, -1] = s[:, -1]
    _addcmul_into(s1[:, :-1], c1[:, :-1], even[:, 1:], g[:, 1:-1:2])
    return g


def _chunk_states(x, dt, A, Bm, keep, h):
    """States of one chunk: x, dt ``(B, T, G, Eg)``, Bm ``(B, T, G, N)``, h the state before it."""
    a = (dt[..., None] * A).exp_()  # (B, T, G, Eg, N)
    if keep is not None:
        a.mul_(keep[:, None, None, None])
    b = (dt * x)[..., None] * Bm[:, :, :, None, :]  # (B, T, G, Eg, N)
    b[:, 0].addcmul_(a[:, 0], h)
    return a, b, _scan(a, b)


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, Bm, Cm, h0, keep, chunk):
        # x, dt (B, L, G, Eg); A (G, Eg, N); Bm, Cm (B, L, G, N); h0 (B, G, Eg, N); keep (L,) or None
        Bsz, L, G, Eg = x.shape
        y = torch.empty_like(x)
        starts = []
        h = h0
        for c0 in range(0, L, chunk):
            sl = slice(c0, c0 + chunk)
            starts.append(h)
            _, _, hs = _chunk_states(x[:, sl], dt[:, sl], A, Bm[:, sl], None if keep is None else keep[sl], h)
            y[:, sl] = torch.einsum("btgen,btgn->btge", hs, Cm[:, sl])
            h = hs[:, -1].clone()  # not a view: the chunk's states must be freed
        ctx.save_for_backward(x, dt, A, Bm, Cm, keep, torch.stack(starts))
        ctx.chunk = chunk
        return y, h

    @staticmethod
    def backward(ctx, gy, gh):
        x, dt, A, Bm, Cm, keep, starts = ctx.saved_tensors
        chunk = ctx.chunk
        L = x.shape[1]
        gx, gdt = torch.empty_like(x), torch.empty_like(dt)
        gB, gC = torch.empty_like(Bm), torch.empty_like(Cm)
        gA = torch.zeros_like(A)
        carry = gh  # dLoss/dh at the end of the current chunk, from the future
        for i, c0 in reversed(list(enumerate(range(0, L, chunk)))):
            sl = slice(c0, c0 + chunk)
            xc, dtc, Bc, Cc, gyc = x[:, sl], dt[:, sl], Bm[:, sl], Cm[:, sl], gy[:, sl]
            a, b, hs = _chunk_states(xc, dtc, A, Bc, None if keep is None else keep[sl], starts[i])
            s = gyc[..., None] * Cc[:, :, :, None, :]  # (B, T, G, Eg, N)
            s[:, -1] += carry
            shifted = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)  # a_{t+1}
            g = _reverse_scan(shifted, s)  # dLoss/dh_t
            gC[:, sl] = torch.einsum("btge,btgen->btgn", gyc, hs)
            gq = g * hs.sub_(b)  # dLoss/d(dt_t * A) = g_t * a_t * h_{t-1}, and a_t h_{t-1} = h_t - b_t ...
            gq[:, 0] = g[:, 0] * a[:, 0] * starts[i]  # ... except at t = 0, where b_0 already holds a_0 h_start
            gBsum = torch.einsum("btgen,btgn->btge", g, Bc)
            gdt[:, sl] = (gq * A).sum(-1) + gBsum * xc
            gx[:, sl] = gBsum * dtc
            gA += torch.einsum("btgen,btge->gen", gq, dtc)
            gB[:, sl] = torch.einsum("btgen,btge->btgn", g, dtc * xc)
            carry = a[:, 0] * g[:, 0]
        return gx, gdt, gA, gB, gC, carry, None, None


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked selective scan; same arguments as :func:`zoo.kernels.selective_scan`."""
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"selective_scan: chunk_size must be a power of two, got {chunk_size}.")
    f = compute_dtype(u.dtype)
    Bsz, E, L = u.shape
    N = A.shape[-1]
    Bg, Cg = grouped(B), grouped(C)
    G = Bg.shape[1]
    Eg = E // G
    dt = delta.to(f)
    if delta_bias is not None:
        dt = dt + delta_bias.to(f)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    uf = u.to(f)
    T = min(chunk_size, 1 << max(L - 1, 0).bit_length())  # short inputs use one small chunk
    pad = (-L) % T  # padded steps have dt = 0: decay 1 and input 0, the state passes through unchanged
    x = F.pad(uf, (0, pad)).transpose(1, 2).reshape(Bsz, L + pad, G, Eg).contiguous()  # (B, L', G, Eg)
    dtx = F.pad(dt, (0, pad)).transpose(1, 2).reshape(Bsz, L + pad, G, Eg).contiguous()
    Bm = F.pad(Bg.to(f), (0, pad)).permute(0, 3, 1, 2).contiguous()  # (B, L', G, N)
    Cm = F.pad(Cg.to(f), (0, pad)).permute(0, 3, 1, 2).contiguous()
    keep = None
    if cu_seqlens is not None:
        keep = F.pad((~sequence_starts(cu_seqlens, L)).to(f), (0, pad), value=1.0)  # decay 0 at sequence starts
    h0 = initial_state.to(f).reshape(Bsz, G, Eg, N) if initial_state is not None else uf.new_zeros(Bsz, G, Eg, N)
    y, h = _ChunkedScan.apply(x, dtx, A.to(f).reshape(G, Eg, N), Bm, Cm, h0, keep, T)
    y = y[:, :L].reshape(Bsz, L, E).transpose(1, 2)  # (B, E, L)
    if D is not None:
        y = y + uf * D.to(f)[:, None]
    if z is not None:
        y = y * F.silu(z.to(f))
    out = y.to(u.dtype)
    return (out, h.reshape(Bsz, E, N)) if return_last_state else out
