"""Chunked selective scan in pure torch: the fast path on CPU.

Tensors are laid out time-major, ``(L, B, G, Eg)`` per channel and ``(T, B, G, Eg, N)`` for a chunk's states,
so the state at one step is one contiguous ``(B, G, Eg, N)`` slab. Time is cut into chunks of ``chunk_size``;
inside a chunk the decays ``a_t = exp(dt_t A)`` and inputs ``b_t = dt_t u_t B_t`` are formed for all steps at
once, then the recurrence ``h_t = a_t h_{t-1} + b_t`` runs step by step *in place* (one fused multiply-add per
step on a slab that stays in cache), and ``y_t = C_t . h_t`` is one batched matmul per chunk. The custom
autograd function keeps memory bounded: the forward stores the state only at chunk starts; the backward
recomputes each chunk's states and runs the reverse recurrence ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` the
same way, forming every gradient with elementwise passes and batched matmuls over the chunk. Each pass
touches a chunk-sized tensor a constant number of times, so the work is linear in L with few memory passes;
no ``(B, L, E, N)`` tensor is ever built for the whole sequence.

On CPU, in training at sizes of ``B * L * E * N`` at least ``COMPILE_MIN_ELEMENTS``, each full chunk's forward and
backward instead run as one ``torch.compile``d function (the steps unrolled; inductor fuses the decays, the
recurrence and the sums over N into a few C++ loops whose state stays in registers), the same algorithm with
fewer memory passes: 1.3-2.5x faster fwd+bwd at Mamba's training shapes (docs/benchmarks.md). The first call per
shape compiles for some seconds; ``ZOO_CPU_COMPILE`` (``zoo.kernels._compile``) chooses: ``never`` keeps the eager
loops, ``always`` compiles at any size (the tests use it); a failed compile warns once and falls back to eager.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.kernels._compile import run_compiled, use_compiled
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


def _mul_into(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = x * y`` into a preallocated buffer (fresh chunk-sized tensors would cost page faults every chunk)."""
    if torch.compiler.is_compiling():
        return out.copy_(x * y)
    return torch.mul(x, y, out=out)


def _bmm_into(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Batched matmul of ``x (M, p, q)`` and ``y (M, q, r)`` written into ``out`` (any view of M * p * r elements)."""
    if torch.compiler.is_compiling():
        return out.copy_(torch.bmm(x, y).view(out.shape))
    torch.bmm(x, y, out=out.view(x.shape[0], x.shape[1], y.shape[2]))
    return out


def _dot_n_into(hs: torch.Tensor, c: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[m, e] = sum_n hs[m, e, n] c[m, n]`` for ``hs (M, Eg, N)``, ``c (M, N)``, written into ``out`` (any view of
    M * Eg elements). A multiply and a sum over the small N: twice as fast on CPU as the batched matrix-vector
    ``bmm(hs, c[..., None])``, whose one-column products MKL runs slowly."""
    if torch.compiler.is_compiling():
        return out.copy_((hs * c[:, None, :]).sum(-1).view(out.shape))
    torch.sum(hs * c[:, None, :], -1, out=out.view(hs.shape[0], hs.shape[1]))
    return out


def _chunk_states(x, dt, A, Bm, keep, h, a, hs):
    """Decays ``a`` and states ``hs`` of one chunk, both ``(T, B, G, Eg, N)``, written into the given buffers.

    x, dt ``(T, B, G, Eg)``; A ``(G, Eg, N)``; Bm ``(T, B, G, N)``; keep ``(T,)`` or None (0 at a sequence start);
    h ``(B, G, Eg, N)`` the state before the chunk.
    """
    a = _mul_into(dt[..., None], A, a).exp_()
    if keep is not None:
        a.mul_(keep[:, None, None, None, None])
    hs = _mul_into((dt * x)[..., None], Bm[:, :, :, None, :], hs)  # b_t, overwritten by h_t below
    prev = h
    for a_t, h_t in zip(a.unbind(0), hs.unbind(0)):
        prev = _addcmul_into(h_t, a_t, prev, h_t)
    return a, hs


#: Scans with at least this many state elements per sequence batch (B * L * E * N) take the compiled CPU path.
COMPILE_MIN_ELEMENTS = 1 << 22


def _decays_inputs(x, dt, A, Bm, keep):
    """A chunk's decays ``exp(dt A)`` (0 at sequence starts), ``dt x`` and inputs ``dt x B``, for the compiled
    functions below."""
    a = torch.exp(dt[..., None] * A)
    if keep is not None:
        a = a * keep[:, None, None, None, None]
    dtx = dt * x
    return a, dtx, dtx[..., None] * Bm[:, :, :, None, :]


def _chunk_fwd(x, dt, A, Bm, Cm, keep, h):
    """One chunk's outputs ``y (T, B, G, Eg)`` and final state, the steps unrolled: what ``torch.compile`` fuses."""
    a, _, b = _decays_inputs(x, dt, A, Bm, keep)
    ys = []
    for t in range(x.shape[0]):
        h = b[t] + a[t] * h
        ys.append((h * Cm[t][:, :, None, :]).sum(-1))
    return torch.stack(ys), h


def _chunk_bwd(x, dt, A, Bm, Cm, keep, gy, h0, carry):
    """One chunk's gradients (x, dt, A's part, B, C) and dLoss/dh before it, given ``carry`` = dLoss/dh at its end;
    the forward states recomputed from ``h0``. The formulas of ``_ChunkedScan.backward``, steps unrolled, every
    gradient formed at its step of the reverse recurrence (3.5x faster compiled than stacking the chunk's states
    and gradients first and reducing after: inductor keeps each step's work in one loop)."""
    T = x.shape[0]
    a, dtx, b = _decays_inputs(x, dt, A, Bm, keep)
    hs, h = [h0], h0
    for t in range(T):
        h = b[t] + a[t] * h
        hs.append(h)
    gx, gdt, gB, gC = [None] * T, [None] * T, [None] * T, [None] * T
    g, gA = carry, None
    for t in range(T - 1, -1, -1):
        g = gy[t][..., None] * Cm[t][:, :, None, :] + (g if t == T - 1 else a[t + 1] * g)  # dLoss/dh_t
        gq = g * a[t] * hs[t]  # dLoss/d(dt_t A) = g_t a_t h_{t-1}
        gBsum = (g * Bm[t][:, :, None, :]).sum(-1)
        gx[t] = gBsum * dt[t]
        gdt[t] = (gq * A).sum(-1) + gBsum * x[t]
        part = (gq * dt[t][..., None]).sum(0)
        gA = part if gA is None else gA + part
        gB[t] = (dtx[t][..., None] * g).sum(-2)
        gC[t] = (gy[t][..., None] * hs[t + 1]).sum(-2)
    return torch.stack(gx), torch.stack(gdt), gA, torch.stack(gB), torch.stack(gC), a[0] * g


def _use_compiled(x: torch.Tensor, N: int, training: bool = True) -> bool:
    """Whether this scan's full chunks run compiled (``zoo.kernels._compile``; B * L * E * N against the threshold)."""
    return use_compiled("selective_scan", x, x.numel() * N, COMPILE_MIN_ELEMENTS, training)


def _run_compiled(name: str, fn, *args):
    return run_compiled("selective_scan", name, fn, *args)


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, Bm, Cm, h0, keep, chunk, training):
        # x, dt (L, B, G, Eg); A (G, Eg, N); Bm, Cm (L, B, G, N); h0 (B, G, Eg, N); keep (L,) or None
        L, Bsz, G, Eg = x.shape
        N = A.shape[-1]
        T0 = min(chunk, L)
        a_buf, hs_buf = (x.new_empty(T0, Bsz, G, Eg, N) for _ in range(2))  # reused by every chunk
        y = torch.empty_like(x)
        starts = x.new_empty(-(-L // chunk), Bsz, G, Eg, N)
        h = h0
        compiled = _use_compiled(x, N, training)
        for i, c0 in enumerate(range(0, L, chunk)):
            sl = slice(c0, c0 + chunk)
            T = min(chunk, L - c0)
            starts[i] = h
            if compiled and T == chunk:  # one shape per scan: the last, shorter chunk runs eager
                res = _run_compiled("fwd", _chunk_fwd, x[sl], dt[sl], A, Bm[sl], Cm[sl],
                                    None if keep is None else keep[sl], h)
                if res is not None:
                    y[sl], h = res
                    continue
                compiled = False
            _, hs = _chunk_states(x[sl], dt[sl], A, Bm[sl], None if keep is None else keep[sl], h, a_buf[:T], hs_buf[:T])
            _dot_n_into(hs.view(-1, Eg, N), Cm[sl].reshape(-1, N), y[sl])
            h = hs[-1].clone()  # not a view of the reused buffer
        ctx.save_for_backward(x, dt, A, Bm, Cm, keep, starts)
        ctx.chunk, ctx.training = chunk, training
        return y, h

    @staticmethod
    def backward(ctx, gy, gh):
        x, dt, A, Bm, Cm, keep, starts = ctx.saved_tensors
        chunk = ctx.chunk
        L, Bsz, G, Eg = x.shape
        N = A.shape[-1]
        gy = gy.contiguous() if gy is not None else torch.zeros_like(x)  # None when only the final state is used
        gx, gdt = torch.empty_like(x), torch.empty_like(dt)
        gB, gC = torch.empty_like(Bm), torch.empty_like(Cm)
        T0 = min(chunk, L)
        a_buf, hs_buf, g_buf = (x.new_empty(T0, Bsz, G, Eg, N) for _ in range(3))  # reused by every chunk
        gA_acc = x.new_zeros(T0, Bsz, G, Eg, N)  # per-position sums of dLoss/d(dt A) * dt; reduced once at the end
        carry = gh if gh is not None else torch.zeros_like(starts[0])  # dLoss/dh at the chunk's end, from the future
        compiled = _use_compiled(x, N, ctx.training)
        gA = None
        for i, c0 in reversed(list(enumerate(range(0, L, chunk)))):
            sl = slice(c0, c0 + chunk)
            T = min(chunk, L - c0)
            if compiled and T == chunk:
                res = _run_compiled("bwd", _chunk_bwd, x[sl], dt[sl], A, Bm[sl], Cm[sl],
                                    None if keep is None else keep[sl], gy[sl], starts[i], carry)
                if res is not None:
                    gx[sl], gdt[sl], gA_c, gB[sl], gC[sl], carry = res
                    gA = gA_c if gA is None else gA.add_(gA_c)
                    continue
                compiled = False
            M = T * Bsz * G
            xc, dtc, Bc, Cc, gyc = x[sl], dt[sl], Bm[sl], Cm[sl], gy[sl]
            a, hs = _chunk_states(xc, dtc, A, Bc, None if keep is None else keep[sl], starts[i], a_buf[:T], hs_buf[:T])
            _bmm_into(gyc.reshape(M, 1, Eg), hs.view(M, Eg, N), gC[sl])
            g = _mul_into(gyc[..., None], Cc[:, :, :, None, :], g_buf[:T])  # C_t dy_t, turned into dLoss/dh_t below
            g[-1].add_(carry)
            gs, as_ = g.unbind(0), a.unbind(0)
            for t in range(T - 2, -1, -1):
                _addcmul_into(gs[t], as_[t + 1], gs[t + 1], gs[t])
            carry = a[0] * g[0]
            # dLoss/d(dt_t A) = g_t * a_t * h_{t-1}, formed in a's buffer
            a[1:].mul_(hs[:-1])
            a[0].mul_(starts[i])
            gq = a.mul_(g)
            _bmm_into((dtc * xc).reshape(M, 1, Eg), g.view(M, Eg, N), gB[sl])
            gBsum = _dot_n_into(g.view(M, Eg, N), Bc.reshape(M, N), torch.empty_like(xc))  # sum_n g B
            gdt[sl] = torch.addcmul(torch.einsum("tbgen,gen->tbge", gq, A), gBsum, xc)
            gx[sl] = gBsum * dtc
            gA_acc[:T].addcmul_(gq, dtc[..., None])
        gA_eager = gA_acc.sum((0, 1))
        return gx, gdt, gA_eager if gA is None else gA.add_(gA_eager), gB, gC, carry, None, None, None


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
    chunk_size: int = 16,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked selective scan; same arguments as :func:`zoo.kernels.selective_scan`."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be a positive int, got {chunk_size!r}.")
    f = compute_dtype(u.dtype)
    Bsz, E, L = u.shape
    N = A.shape[-1]
    Bg, Cg = grouped(B), grouped(C)
    G = Bg.shape[1]
    Eg = E // G

    def time_major(t: torch.Tensor) -> torch.Tensor:  # (B, E, L) -> (L, B, E), contiguous
        return t.to(f).permute(2, 0, 1).contiguous()

    # Everything per channel runs time-major, so no elementwise op (forward or backward) walks a strided layout.
    uf, dt = time_major(u), time_major(delta)
    if delta_bias is not None:
        dt = dt + delta_bias.to(f)
    if delta_softplus:
        dt = F.softplus(dt)
    Bm = Bg.to(f).permute(3, 0, 1, 2).contiguous()  # (L, B, G, N)
    Cm = Cg.to(f).permute(3, 0, 1, 2).contiguous()
    keep = None
    if cu_seqlens is not None:
        keep = (~sequence_starts(cu_seqlens, L)).to(f)  # decay 0 at sequence starts
    h0 = initial_state.to(f).reshape(Bsz, G, Eg, N) if initial_state is not None else uf.new_zeros(Bsz, G, Eg, N)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, delta, A, B, C, initial_state))
    y, h = _ChunkedScan.apply(uf.view(L, Bsz, G, Eg), dt.view(L, Bsz, G, Eg), A.to(f).reshape(G, Eg, N), Bm, Cm, h0,
                              keep, chunk_size, training)
    y = y.view(L, Bsz, E)
    if D is not None:
        y = y + uf * D.to(f)
    if z is not None:
        y = y * F.silu(time_major(z))
    out = y.to(u.dtype).permute(1, 2, 0)  # (B, E, L), a view of the time-major result
    return (out, h.reshape(Bsz, E, N)) if return_last_state else out
