"""Triton causal depthwise conv1d, forward and backward.

Both kernels work on ``xfull = cat(initial_states, x)`` ``(B, E, W-1+L)`` so the initial state is just the
first ``W-1`` columns. ``pos`` (packed input only) is each token's position inside its own sequence; a tap
that looks back ``lag`` steps is dropped where ``pos < lag``, so nothing leaks across sequences.
The channel and time blocks are masked, so any channel count and length work; the length is not specialised
(one compile serves every L) and masks are comparisons of block tensors, valid on Triton 3.6 to 3.9.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["L"])
def _fwd_kernel(xf_ptr, w_ptr, b_ptr, pos_ptr, out_ptr, E, L,
                W: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr):
    pid_b, pid_e, pid_l = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    me, mt = offs_e < E, offs_t < L
    m2 = me[:, None] & mt[None, :]
    Lf = L + W - 1
    acc = tl.zeros([BLOCK_E, BLOCK_L], dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_e, mask=me, other=0.0).to(ACC)[:, None]
    if HAS_POS:
        pos = tl.load(pos_ptr + offs_t, mask=mt, other=0)
    for k in tl.static_range(W):
        w = tl.load(w_ptr + offs_e * W + k, mask=me, other=0.0).to(ACC)
        xv = tl.load(xf_ptr + pid_b * E * Lf + offs_e[:, None] * Lf + offs_t[None, :] + k, mask=m2, other=0.0).to(ACC)
        if HAS_POS:
            xv = tl.where((pos >= W - 1 - k)[None, :], xv, 0.0)
        acc += w[:, None] * xv
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + pid_b * E * L + offs_e[:, None] * L + offs_t[None, :], acc, mask=m2)


@triton.jit(do_not_specialize=["L", "n_lblocks"])
def _bwd_kernel(xf_ptr, w_ptr, pos_ptr, dpre_ptr, dxf_ptr, dw_ptr, E, L, n_lblocks,
                W: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
                HAS_POS: tl.constexpr, ACC: tl.constexpr):
    pid_b, pid_e, pid_l = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_s = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)  # column of xfull (for dx) and output step (for dw)
    me = offs_e < E
    Lf = L + W - 1
    dx = tl.zeros([BLOCK_E, BLOCK_L], dtype=ACC)
    for k in tl.static_range(W):
        w = tl.load(w_ptr + offs_e * W + k, mask=me, other=0.0).to(ACC)
        # xfull column s feeds output t = s - k through tap k
        t = offs_s - k
        mt = (t >= 0) & (t < L)
        ok = mt
        if HAS_POS:
            ok = ok & (tl.load(pos_ptr + t, mask=mt, other=0) >= W - 1 - k)
        d = tl.load(dpre_ptr + pid_b * E * L + offs_e[:, None] * L + t[None, :], mask=me[:, None] & ok[None, :],
                    other=0.0).to(ACC)
        dx += w[:, None] * d
        # dw[k] partial: sum over output steps t = offs_s of dpre[t] * xfull[t + k]
        mo = offs_s < L
        oko = mo
        if HAS_POS:
            oko = oko & (tl.load(pos_ptr + offs_s, mask=mo, other=0) >= W - 1 - k)
        m2 = me[:, None] & oko[None, :]
        dp = tl.load(dpre_ptr + pid_b * E * L + offs_e[:, None] * L + offs_s[None, :], mask=m2, other=0.0).to(ACC)
        xv = tl.load(xf_ptr + pid_b * E * Lf + offs_e[:, None] * Lf + offs_s[None, :] + k, mask=m2, other=0.0).to(ACC)
        tl.store(dw_ptr + ((pid_b * n_lblocks + pid_l) * E + offs_e) * W + k, tl.sum(dp * xv, axis=1), mask=me)
    tl.store(dxf_ptr + pid_b * E * Lf + offs_e[:, None] * Lf + offs_s[None, :], dx,
             mask=me[:, None] & (offs_s < Lf)[None, :])


_BLOCK_E, _BLOCK_L = 16, 64


def _acc(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _conv(xf, weight, bias, pos, silu, out_dtype):
    Bsz, E, Lf = xf.shape
    W = weight.shape[1]
    L = Lf - (W - 1)
    out = torch.full((Bsz, E, L), float("nan"), dtype=out_dtype, device=xf.device)
    grid = (Bsz, triton.cdiv(E, _BLOCK_E), triton.cdiv(L, _BLOCK_L))
    _fwd_kernel[grid](xf, weight, xf if bias is None else bias, xf if pos is None else pos, out, E, L,
                      W=W, BLOCK_E=_BLOCK_E, BLOCK_L=_BLOCK_L, HAS_BIAS=bias is not None, HAS_POS=pos is not None,
                      SILU=silu, ACC=_acc(xf))
    return out


class _TritonConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xf, weight, bias, pos, silu):
        ctx.save_for_backward(xf, weight, bias, pos)
        ctx.silu = silu
        return _conv(xf, weight, bias, pos, silu, xf.dtype)

    @staticmethod
    def backward(ctx, dout):
        xf, weight, bias, pos = ctx.saved_tensors
        Bsz, E, Lf = xf.shape
        W = weight.shape[1]
        L = Lf - (W - 1)
        f = torch.float64 if xf.dtype == torch.float64 else torch.float32
        dpre = dout.to(f)
        if ctx.silu:  # recompute the pre-activation and apply silu'
            pre = _conv(xf, weight, bias, pos, False, f)
            s = torch.sigmoid(pre)
            dpre = dpre * s * (1 + pre * (1 - s))
        dpre = dpre.contiguous()
        n_lblocks = triton.cdiv(Lf, _BLOCK_L)
        dxf = torch.full((Bsz, E, Lf), float("nan"), dtype=f, device=xf.device)
        dw = torch.full((Bsz, n_lblocks, E, W), float("nan"), dtype=f, device=xf.device)
        _bwd_kernel[(Bsz, triton.cdiv(E, _BLOCK_E), n_lblocks)](
            xf, weight, xf if pos is None else pos, dpre, dxf, dw, E, L, n_lblocks,
            W=W, BLOCK_E=_BLOCK_E, BLOCK_L=_BLOCK_L, HAS_POS=pos is not None, ACC=_acc(xf),
        )
        dbias = None if bias is None else dpre.sum((0, 2)).to(bias.dtype)
        return dxf.to(xf.dtype), dw.sum((0, 1)).to(weight.dtype), dbias, None, None


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    initial_states: torch.Tensor | None,
    pos: torch.Tensor | None,
) -> torch.Tensor:
    """Triton causal conv of ``x (B, E, L)``; ``pos (L,)`` int32 positions inside packed sequences or None."""
    W = weight.shape[1]
    if initial_states is None:
        xf = F.pad(x, (W - 1, 0))  # (B, E, W-1+L)
    else:
        xf = torch.cat([initial_states.to(x.dtype), x], dim=-1)
    return _TritonConv.apply(xf.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
                             pos, silu)
