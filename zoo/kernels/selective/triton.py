"""Triton selective scan, forward and backward.

Each program owns one batch row and a block of channels; it keeps the ``(BLOCK_E, N)`` state in registers and
walks the sequence, so no ``(B, E, L, N)`` tensor is written. The forward also stores the state at every
chunk start (``(B, L/CHUNK, E, N)``). The backward walks the chunks in reverse: it recomputes one chunk's
states from its stored start into a chunk-sized scratch buffer, then runs the reverse recurrence
``g_t = C_t dy_t + a_{t+1} g_{t+1}`` and emits du, ddelta, dA, dB, dC, dD, dz, ddelta_bias and dh0.
Softplus, delta_bias, D and the silu(z) gate are fused in.

Portability (Triton 3.6 to 3.9, compiled and interpreted): the chunk and time loops are ``while`` loops over
runtime bounds (Triton 3.6's interpreter cannot take ``range()`` of a runtime bound under NumPy 2.4) and the
length and its strides are not specialised, so one compile serves every sequence length; masks are
comparisons of block tensors (a broadcast scalar bool is not a valid mask in Triton 3.9's interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.kernels._dispatch import compute_dtype
from zoo.kernels.selective.chunked import grouped
from zoo.packing import sequence_starts


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _load_step(u_ptr, delta_ptr, bias, B_ptr, C_ptr, keep_ptr, A, row, bc_row, t, L, offs_e, mask_e, offs_n, mask2,
               sBn, sBl, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_KEEP: tl.constexpr,
               ACC: tl.constexpr):
    """Load step ``t < L`` of a channel block: u, dt, decay a, B_t, C_t and the pre-softplus delta."""
    uv = tl.load(u_ptr + row + offs_e * L + t, mask=mask_e, other=0.0).to(ACC)
    raw = tl.load(delta_ptr + row + offs_e * L + t, mask=mask_e, other=0.0).to(ACC)
    if HAS_BIAS:
        raw = raw + bias
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    dt = tl.where(mask_e, dt, 0.0)
    bc = bc_row[:, None] + offs_n[None, :] * sBn + t * sBl
    Bt = tl.load(B_ptr + bc, mask=mask2, other=0.0).to(ACC)
    Ct = tl.load(C_ptr + bc, mask=mask2, other=0.0).to(ACC)
    a = tl.exp(dt[:, None] * A)
    if HAS_KEEP:
        a = a * tl.load(keep_ptr + t).to(ACC)
    return uv, raw, dt, a, Bt, Ct


@triton.jit
def _program_tile(A_ptr, E, N, L, Eg, sBb, sBg, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """This program's batch row and channel block: the indices and masks of its ``(BLOCK_E, BLOCK_N)`` state tile,
    that tile of A, and the row offsets of u / delta and of B / C (the channels' group)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_e = tl.program_id(1)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    mask_e, mask_n = offs_e < E, offs_n < N
    mask2 = mask_e[:, None] & mask_n[None, :]
    en = offs_e[:, None] * N + offs_n[None, :]
    A = tl.load(A_ptr + en, mask=mask2, other=0.0).to(ACC)
    return pid_b, pid_e, offs_e, offs_n, mask_e, mask_n, mask2, en, A, pid_b * E * L, pid_b * sBb + (offs_e // Eg) * sBg


@triton.jit
def _channel_vector(P, offs_e, mask_e, HAS: tl.constexpr, BLOCK_E: tl.constexpr, ACC: tl.constexpr):
    """This block's entries of an optional per-channel vector (delta_bias, D); zeros when it is absent."""
    v = tl.zeros([BLOCK_E], dtype=ACC)
    if HAS:
        v = tl.load(P + offs_e, mask=mask_e, other=0.0).to(ACC)
    return v


@triton.jit(do_not_specialize=["L", "sBb", "sBg", "sBn"])
def _fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, keep_ptr,
                out_ptr, hchunk_ptr, hlast_ptr,
                E, N, L, Eg, sBb, sBg, sBn, sBl,
                CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                HAS_H0: tl.constexpr, HAS_KEEP: tl.constexpr, ACC: tl.constexpr):
    pid_b, _, offs_e, offs_n, mask_e, _, mask2, en, A, row, bc_row = _program_tile(
        A_ptr, E, N, L, Eg, sBb, sBg, BLOCK_E, BLOCK_N, ACC)
    bias = _channel_vector(bias_ptr, offs_e, mask_e, HAS_BIAS, BLOCK_E, ACC)
    Dv = _channel_vector(D_ptr, offs_e, mask_e, HAS_D, BLOCK_E, ACC)
    h = tl.zeros([BLOCK_E, BLOCK_N], dtype=ACC)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * E * N + en, mask=mask2, other=0.0).to(ACC)
    n_chunks = tl.cdiv(L, CHUNK)
    c = 0
    while c < n_chunks:
        tl.store(hchunk_ptr + (pid_b * n_chunks + c) * E * N + en, h, mask=mask2)
        t = c * CHUNK
        t_end = tl.minimum(t + CHUNK, L)
        while t < t_end:
            uv, raw, dt, a, Bt, Ct = _load_step(u_ptr, delta_ptr, bias, B_ptr, C_ptr, keep_ptr, A, row, bc_row, t, L,
                                                offs_e, mask_e, offs_n, mask2, sBn, sBl,
                                                HAS_BIAS, SOFTPLUS, HAS_KEEP, ACC)
            h = a * h + (dt * uv)[:, None] * Bt
            y = tl.sum(h * Ct, axis=1) + Dv * uv
            if HAS_Z:
                zv = tl.load(z_ptr + row + offs_e * L + t, mask=mask_e, other=0.0).to(ACC)
                y = y * zv * tl.sigmoid(zv)
            tl.store(out_ptr + row + offs_e * L + t, y, mask=mask_e)
            t += 1
        c += 1
    tl.store(hlast_ptr + pid_b * E * N + en, h, mask=mask2)


@triton.jit(do_not_specialize=["L", "sBb", "sBg", "sBn"])
def _bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, keep_ptr, hchunk_ptr,
                dout_ptr, dlast_ptr, scratch_ptr,
                du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr, dh0_ptr,
                E, N, L, Eg, n_eblocks, sBb, sBg, sBn, sBl,
                CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                HAS_DLAST: tl.constexpr, HAS_KEEP: tl.constexpr, ACC: tl.constexpr):
    pid_b, pid_e, offs_e, offs_n, mask_e, mask_n, mask2, en, A, row, bc_row = _program_tile(
        A_ptr, E, N, L, Eg, sBb, sBg, BLOCK_E, BLOCK_N, ACC)
    part_row = (pid_b * n_eblocks + pid_e) * N * L  # this block's partial dB / dC, (N, L)
    scratch = scratch_ptr + (pid_b * n_eblocks + pid_e) * CHUNK * BLOCK_E * BLOCK_N
    sc = tl.arange(0, BLOCK_E)[:, None] * BLOCK_N + offs_n[None, :]
    bias = _channel_vector(bias_ptr, offs_e, mask_e, HAS_BIAS, BLOCK_E, ACC)
    Dv = _channel_vector(D_ptr, offs_e, mask_e, HAS_D, BLOCK_E, ACC)
    g = tl.zeros([BLOCK_E, BLOCK_N], dtype=ACC)  # dLoss/dh_t, carried backwards
    if HAS_DLAST:
        g = tl.load(dlast_ptr + pid_b * E * N + en, mask=mask2, other=0.0).to(ACC)
    dA_acc = tl.zeros([BLOCK_E, BLOCK_N], dtype=ACC)
    dD_acc = tl.zeros([BLOCK_E], dtype=ACC)
    dbias_acc = tl.zeros([BLOCK_E], dtype=ACC)
    n_chunks = tl.cdiv(L, CHUNK)
    c = n_chunks - 1
    while c >= 0:
        h_start = tl.load(hchunk_ptr + (pid_b * n_chunks + c) * E * N + en, mask=mask2, other=0.0).to(ACC)
        t0 = c * CHUNK
        n_steps = tl.minimum(CHUNK, L - t0)
        h = h_start
        i = 0
        while i < n_steps:  # recompute this chunk's states
            uv, raw, dt, a, Bt, Ct = _load_step(u_ptr, delta_ptr, bias, B_ptr, C_ptr, keep_ptr, A, row, bc_row,
                                                t0 + i, L, offs_e, mask_e, offs_n, mask2, sBn, sBl,
                                                HAS_BIAS, SOFTPLUS, HAS_KEEP, ACC)
            h = a * h + (dt * uv)[:, None] * Bt
            tl.store(scratch + i * BLOCK_E * BLOCK_N + sc, h)
            i += 1
        tl.debug_barrier()  # the reverse pass reads states other threads may have written
        i = n_steps - 1
        while i >= 0:
            t = t0 + i
            uv, raw, dt, a, Bt, Ct = _load_step(u_ptr, delta_ptr, bias, B_ptr, C_ptr, keep_ptr, A, row, bc_row, t, L,
                                                offs_e, mask_e, offs_n, mask2, sBn, sBl,
                                                HAS_BIAS, SOFTPLUS, HAS_KEEP, ACC)
            h_t = tl.load(scratch + i * BLOCK_E * BLOCK_N + sc)
            h_prev = tl.load(scratch + tl.maximum(i - 1, 0) * BLOCK_E * BLOCK_N + sc)
            h_prev = tl.where(tl.full([BLOCK_E, BLOCK_N], i, tl.int32) > 0, h_prev, h_start)
            dy = tl.load(dout_ptr + row + offs_e * L + t, mask=mask_e, other=0.0).to(ACC)
            if HAS_Z:
                zv = tl.load(z_ptr + row + offs_e * L + t, mask=mask_e, other=0.0).to(ACC)
                sz = tl.sigmoid(zv)
                y = tl.sum(h_t * Ct, axis=1) + Dv * uv
                tl.store(dz_ptr + row + offs_e * L + t, dy * y * sz * (1.0 + zv * (1.0 - sz)), mask=mask_e)
                dy = dy * zv * sz
            dD_acc += dy * uv
            g += dy[:, None] * Ct
            tl.store(dC_ptr + part_row + offs_n * L + t, tl.sum(dy[:, None] * h_t, axis=0), mask=mask_n)
            gq = g * h_prev * a  # dLoss/d(dt_t * A)
            gBsum = tl.sum(g * Bt, axis=1)
            gdt = tl.sum(gq * A, axis=1) + gBsum * uv
            tl.store(du_ptr + row + offs_e * L + t, gBsum * dt + dy * Dv, mask=mask_e)
            dA_acc += gq * dt[:, None]
            tl.store(dB_ptr + part_row + offs_n * L + t, tl.sum(g * (dt * uv)[:, None], axis=0), mask=mask_n)
            if SOFTPLUS:
                gdt = tl.where(raw > 20.0, gdt, gdt * tl.sigmoid(raw))
            gdt = tl.where(mask_e, gdt, 0.0)
            tl.store(ddelta_ptr + row + offs_e * L + t, gdt, mask=mask_e)
            dbias_acc += gdt
            g = g * a
            i -= 1
        tl.debug_barrier()  # the next chunk overwrites the scratch states
        c -= 1
    tl.store(dh0_ptr + pid_b * E * N + en, g, mask=mask2)
    tl.store(dA_ptr + pid_b * E * N + en, dA_acc, mask=mask2)
    tl.store(dD_ptr + pid_b * E + offs_e, dD_acc, mask=mask_e)
    tl.store(dbias_ptr + pid_b * E + offs_e, dbias_acc, mask=mask_e)


def _block_e(Eg: int) -> int:
    """Largest power of two (at most 32) dividing the channels per group, so a block never spans two groups."""
    b = 1
    while b < 32 and Eg % (2 * b) == 0:
        b *= 2
    return b


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, Bg, Cg, D, z, delta_bias, h0, keep, softplus, chunk):
        Bsz, E, L = u.shape
        N = A.shape[1]
        G = Bg.shape[1]
        acc = tl.float64 if u.dtype == torch.float64 else tl.float32
        fdt = torch.float64 if u.dtype == torch.float64 else torch.float32
        BLOCK_E = _block_e(E // G)
        n_chunks = triton.cdiv(L, chunk)
        out = torch.full((Bsz, E, L), float("nan"), dtype=fdt, device=u.device)
        hchunk = torch.full((Bsz, n_chunks, E, N), float("nan"), dtype=fdt, device=u.device)
        hlast = torch.full((Bsz, E, N), float("nan"), dtype=fdt, device=u.device)
        grid = (Bsz, triton.cdiv(E, BLOCK_E))
        _fwd_kernel[grid](
            u, delta, A, Bg, Cg, u if D is None else D, u if z is None else z, u if delta_bias is None else delta_bias,
            u if h0 is None else h0, u if keep is None else keep, out, hchunk, hlast,
            E, N, L, E // G, *Bg.stride(),
            CHUNK=chunk, BLOCK_E=BLOCK_E, BLOCK_N=triton.next_power_of_2(N),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
            HAS_H0=h0 is not None, HAS_KEEP=keep is not None, ACC=acc,
        )
        ctx.save_for_backward(u, delta, A, Bg, Cg, D, z, delta_bias, keep, hchunk)
        ctx.softplus, ctx.chunk, ctx.block_e, ctx.acc, ctx.has_h0 = softplus, chunk, BLOCK_E, acc, h0 is not None
        return out, hlast

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, Bg, Cg, D, z, delta_bias, keep, hchunk = ctx.saved_tensors
        Bsz, E, L = u.shape
        N, G = A.shape[1], Bg.shape[1]
        chunk, BLOCK_E = ctx.chunk, ctx.block_e
        BLOCK_N = triton.next_power_of_2(N)
        n_eblocks = triton.cdiv(E, BLOCK_E)
        fdt = hchunk.dtype

        def buf(*shape):
            return torch.full(shape, float("nan"), dtype=fdt, device=u.device)

        du, ddelta, dz = buf(Bsz, E, L), buf(Bsz, E, L), buf(Bsz, E, L)
        dA, dD, dbias, dh0 = buf(Bsz, E, N), buf(Bsz, E), buf(Bsz, E), buf(Bsz, E, N)
        dB, dC = buf(Bsz, n_eblocks, N, L), buf(Bsz, n_eblocks, N, L)
        scratch = buf(Bsz, n_eblocks, chunk, BLOCK_E, BLOCK_N)
        _bwd_kernel[(Bsz, n_eblocks)](
            u, delta, A, Bg, Cg, u if D is None else D, u if z is None else z, u if delta_bias is None else delta_bias,
            u if keep is None else keep, hchunk, dout.contiguous(), u if dlast is None else dlast.contiguous(), scratch,
            du, ddelta, dz, dA, dD, dbias, dB, dC, dh0,
            E, N, L, E // G, n_eblocks, *Bg.stride(),
            CHUNK=chunk, BLOCK_E=BLOCK_E, BLOCK_N=BLOCK_N,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.softplus,
            HAS_DLAST=dlast is not None, HAS_KEEP=keep is not None, ACC=ctx.acc,
        )
        dB = dB.view(Bsz, G, n_eblocks // G, N, L).sum(2)  # blocks never span groups
        dC = dC.view(Bsz, G, n_eblocks // G, N, L).sum(2)
        return (
            du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(A.dtype), dB.to(Bg.dtype), dC.to(Cg.dtype),
            None if D is None else dD.sum(0).to(D.dtype), None if z is None else dz.to(z.dtype),
            None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype), dh0 if ctx.has_h0 else None,
            None, None, None,
        )


def selective_scan_triton(
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
    """Triton selective scan; same arguments as :func:`zoo.kernels.selective_scan`."""
    L = u.shape[-1]
    keep = None
    if cu_seqlens is not None:
        keep = (~sequence_starts(cu_seqlens, L)).to(torch.float32)  # decay 0 at sequence starts
    chunk = chunk_size  # not clipped to L: the chunk is a compile-time constant and must not follow the length
    f = compute_dtype(u.dtype)

    def c(t):
        return None if t is None else t.contiguous()

    out, h = _TritonScan.apply(
        c(u), c(delta), A.to(f).contiguous(), c(grouped(B)), c(grouped(C)), c(D), c(z), c(delta_bias),
        None if initial_state is None else initial_state.to(f).contiguous(), keep, bool(delta_softplus), chunk,
    )
    out = out.to(u.dtype)
    return (out, h) if return_last_state else out
