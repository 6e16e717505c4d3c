"""Triton forward and backward of ``linear_scan``.

One program per (sequence, block of channels) walks through time and keeps the state in registers
(float32, or float64 for float64 inputs). Complex tensors are read as interleaved (real, imag) pairs.
The backward pass walks the other way: ``g_t = dy_t + conj(a_next) g_next``, ``da_t = g_t conj(h_prev)``,
``db_t = g_t`` and ``dh0 = conj(a_first) g_first``, matching torch autograd's complex convention.

Portability (Triton 3.6 to 3.9, compiled and interpreted): time loops are ``while`` loops over a runtime
length (Triton 3.6's interpreter cannot take ``range()`` of a runtime bound under NumPy 2.4), the length is
never specialised (``do_not_specialize``), so one compile serves every sequence length; every mask is a
comparison of block tensors (a broadcast scalar bool is not a valid mask in Triton 3.9's interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.kernels._dispatch import compute_dtype


@triton.jit
def _bounds(CU, i_n, L, VARLEN: tl.constexpr):
    """First row and length of sequence ``i_n`` in the flattened ``(B * L)`` rows."""
    if VARLEN:
        bos = tl.load(CU + i_n).to(tl.int64)
        T = (tl.load(CU + i_n + 1) - tl.load(CU + i_n)).to(tl.int32)
    else:
        bos = i_n.to(tl.int64) * L
        T = L
    return bos, T


@triton.jit
def _program_block(CU, L, D, VARLEN: tl.constexpr, W: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's sequence (first row, length) and channel block: channels ``d``, their mask and their offset
    in the ``(N, D)`` states (``W`` floats per element: 2 for complex)."""
    i_n = tl.program_id(0)
    bos, T = _bounds(CU, i_n, L, VARLEN)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = d < D
    return bos, T, d, m, (i_n.to(tl.int64) * D + d) * W


@triton.jit
def _load_state(P, s_off, m, PRESENT: tl.constexpr, COMPLEX: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Real and imaginary part of a ``(N, D)`` state (or its gradient) at ``s_off``; zeros where it is not
    ``PRESENT`` (the imaginary part also for real scans)."""
    re = tl.zeros([BLOCK_D], dtype=ACC)
    im = tl.zeros([BLOCK_D], dtype=ACC)
    if PRESENT:
        re = tl.load(P + s_off, mask=m, other=0).to(ACC)
        if COMPLEX:
            im = tl.load(P + s_off + 1, mask=m, other=0).to(ACC)
    return re, im


@triton.jit(do_not_specialize=["L"])
def _scan_fwd_kernel(
    A, X, H0, H, HL, CU, L, D,
    HAS_H0: tl.constexpr, REVERSE: tl.constexpr, VARLEN: tl.constexpr, COMPLEX: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    W: tl.constexpr = 2 if COMPLEX else 1
    bos, T, d, m, s_off = _program_block(CU, L, D, VARLEN, W, BLOCK_D)
    hr, hi = _load_state(H0, s_off, m, HAS_H0, COMPLEX, BLOCK_D, ACC)
    i = 0
    while i < T:  # a while loop: Triton's interpreter cannot take range() over a runtime bound with numpy 2.4
        t = bos + T - 1 - i if REVERSE else bos + i
        i += 1
        off = (t * D + d) * W
        ar = tl.load(A + off, mask=m, other=0).to(ACC)
        xr = tl.load(X + off, mask=m, other=0).to(ACC)
        if COMPLEX:
            ai = tl.load(A + off + 1, mask=m, other=0).to(ACC)
            xi = tl.load(X + off + 1, mask=m, other=0).to(ACC)
            hr, hi = ar * hr - ai * hi + xr, ar * hi + ai * hr + xi
            tl.store(H + off + 1, hi.to(H.dtype.element_ty), mask=m)
        else:
            hr = ar * hr + xr
        tl.store(H + off, hr.to(H.dtype.element_ty), mask=m)
    tl.store(HL + s_off, hr.to(HL.dtype.element_ty), mask=m)
    if COMPLEX:
        tl.store(HL + s_off + 1, hi.to(HL.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["L"])
def _scan_bwd_kernel(
    A, H, H0, DH, DHL, DA, DX, DH0, CU, L, D,
    HAS_H0: tl.constexpr, REVERSE: tl.constexpr, VARLEN: tl.constexpr, COMPLEX: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    W: tl.constexpr = 2 if COMPLEX else 1
    bos, T, d, m, s_off = _program_block(CU, L, D, VARLEN, W, BLOCK_D)
    # carry = conj(a_next) * g_next, seeded with the gradient of the final state
    cr, ci = _load_state(DHL, s_off, m, True, COMPLEX, BLOCK_D, ACC)
    h0r, h0i = _load_state(H0, s_off, m, HAS_H0, COMPLEX, BLOCK_D, ACC)
    first = bos + T - 1 if REVERSE else bos
    i = 0
    while i < T:
        t = bos + i if REVERSE else bos + T - 1 - i
        i += 1
        tp = t + 1 if REVERSE else t - 1
        off = (t * D + d) * W
        p_off = (tp * D + d) * W
        not_first = tl.full([BLOCK_D], t, tl.int64) != first  # a block, not a broadcast scalar bool
        mp = m & not_first
        gr = tl.load(DH + off, mask=m, other=0).to(ACC) + cr
        pr = tl.where(not_first, tl.load(H + p_off, mask=mp, other=0).to(ACC), h0r)
        ar = tl.load(A + off, mask=m, other=0).to(ACC)
        tl.store(DX + off, gr.to(DX.dtype.element_ty), mask=m)
        if COMPLEX:
            gi = tl.load(DH + off + 1, mask=m, other=0).to(ACC) + ci
            pi = tl.where(not_first, tl.load(H + p_off + 1, mask=mp, other=0).to(ACC), h0i)
            ai = tl.load(A + off + 1, mask=m, other=0).to(ACC)
            tl.store(DX + off + 1, gi.to(DX.dtype.element_ty), mask=m)
            tl.store(DA + off, (gr * pr + gi * pi).to(DA.dtype.element_ty), mask=m)
            tl.store(DA + off + 1, (gi * pr - gr * pi).to(DA.dtype.element_ty), mask=m)
            cr, ci = ar * gr + ai * gi, ar * gi - ai * gr
        else:
            tl.store(DA + off, (gr * pr).to(DA.dtype.element_ty), mask=m)
            cr = ar * gr
    if HAS_H0:
        tl.store(DH0 + s_off, cr.to(DH0.dtype.element_ty), mask=m)
        if COMPLEX:
            tl.store(DH0 + s_off + 1, ci.to(DH0.dtype.element_ty), mask=m)


def _real(x: torch.Tensor) -> torch.Tensor:
    """Contiguous real view: complex ``(..., D)`` -> float ``(..., D, 2)``."""
    x = x.contiguous()
    return torch.view_as_real(x) if x.is_complex() else x


def _launch_args(a: torch.Tensor, cu_seqlens: torch.Tensor | None, rows: int) -> dict:
    B, L, D = a.shape
    block = min(triton.next_power_of_2(D), 128)
    return dict(
        grid=(rows, triton.cdiv(D, block)),
        L=L,
        D=D,
        VARLEN=cu_seqlens is not None,
        COMPLEX=a.is_complex(),
        ACC=tl.float64 if compute_dtype(a.dtype) in (torch.float64, torch.complex128) else tl.float32,
        BLOCK_D=block,
    )


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, reverse, cu_seqlens):
        B, L, D = a.shape
        rows = cu_seqlens.numel() - 1 if cu_seqlens is not None else B
        cu = cu_seqlens.to(device=a.device, dtype=torch.int64).contiguous() if cu_seqlens is not None else None
        a, b = a.contiguous(), b.contiguous()
        h = torch.full_like(b, float("nan"))
        h_last = torch.full((rows, D), float("nan"), dtype=b.dtype, device=b.device)
        args = _launch_args(a, cu, rows)
        grid = args.pop("grid")
        h0 = h0.contiguous() if h0 is not None else None
        hr = _real(h)  # also the placeholder for absent optional pointers
        _scan_fwd_kernel[grid](
            _real(a), _real(b), _real(h0) if h0 is not None else hr, hr, _real(h_last),
            cu if cu is not None else hr, HAS_H0=h0 is not None, REVERSE=reverse, **args,
        )
        ctx.reverse, ctx.rows = reverse, rows
        ctx.save_for_backward(a, h, h0, cu)
        return h, h_last

    @staticmethod
    def backward(ctx, dh, dh_last):
        a, h, h0, cu = ctx.saved_tensors
        rows = ctx.rows
        dh = dh.to(h.dtype).contiguous()
        dh_last = dh_last.to(h.dtype).contiguous()
        da = torch.full_like(a, float("nan"))
        db = torch.full_like(h, float("nan"))
        dh0 = torch.full_like(h0, float("nan")) if h0 is not None else None
        args = _launch_args(a, cu, rows)
        grid = args.pop("grid")
        hr = _real(h)  # also the placeholder for absent optional pointers
        _scan_bwd_kernel[grid](
            _real(a), hr, _real(h0) if h0 is not None else hr, _real(dh), _real(dh_last),
            _real(da), _real(db), _real(dh0) if dh0 is not None else hr, cu if cu is not None else hr,
            HAS_H0=h0 is not None, REVERSE=ctx.reverse, **args,
        )
        return da, db, dh0, None, None


def linear_scan_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``linear_scan`` (validated inputs); same contract as ``linear_scan_ref``."""
    if h0 is not None:  # the state is carried in the accumulation dtype (float32 for half inputs)
        h0 = h0.to(compute_dtype(a.dtype))
    return _TritonScan.apply(a, b, h0, reverse, cu_seqlens)
