"""Gated linear attention in Triton: a chunked forward kernel and a chunked backward kernel.

One program per (value block, batch, head) walks the chunks in order with its K x BV slice of the state in
registers (value columns are independent; dq and dk are summed over the value blocks afterwards). The number of
chunks is a compile-time constant (the Triton 3.6 interpreter under NumPy >= 2.4 cannot use a runtime
integer as a loop bound), so each sequence length compiles once.
Scalar decay: the intra-chunk part is two ``tl.dot`` with the masked decay matrix ``exp(G_i - G_j)``.
Per-key-dim decay: the intra-chunk part loops over the chunk's rows and uses the exact masked
``exp(G_i - G_j)`` per key dim, which never overflows (no ``exp(-G)`` factorisation).

The backward kernel recomputes the states in a forward sweep (giving dq), then walks the chunks in reverse
with the state gradient (giving dk, dv and d initial_state). The decay gradient follows from the identity
``dG_t = q_t * dq_t - k_t * dk_t`` for the global cumulative log-decay ``G``, plus ``sum_v S_T * dS_T`` at the
last step; ``dg`` is the reverse cumulative sum of ``dG`` over time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from einops import rearrange

MAX_BV = 64  # value columns per program: the state a program holds is K x MAX_BV


@triton.jit
def _load_chunk(ptr, base, t0, STRIDE: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, ACC: tl.constexpr):
    rows = t0 + tl.arange(0, BT)
    return tl.load(ptr + base + rows[:, None] * STRIDE + tl.arange(0, W)[None, :]).to(ACC)  # (BT, W)


@triton.jit
def _load_row(ptr, base, t, STRIDE: tl.constexpr, W: tl.constexpr, ACC: tl.constexpr):
    return tl.load(ptr + base + t * STRIDE + tl.arange(0, W)).to(ACC)  # (W,)


@triton.jit
def _gla_fwd_kernel(
    q, k, v, G, h0, o, hT, scale,
    NT: tl.constexpr, K: tl.constexpr, VT: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    PER_KEY: tl.constexpr, USE_H0: tl.constexpr, ACC: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    T = NT * BT
    bk = i_bh * T * K
    bv = i_bh * T * VT + i_v * BV  # this program's value columns
    bg = i_bh * T * K if PER_KEY else i_bh * T
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, K)
    offs_v = tl.arange(0, BV)
    causal = offs_t[:, None] >= offs_t[None, :]
    p_state = i_bh * K * VT + i_v * BV + offs_k[:, None] * VT + offs_v[None, :]
    S = tl.zeros((K, BV), dtype=ACC)
    if USE_H0:
        S += tl.load(h0 + p_state).to(ACC)
    for n in range(NT):
        t0 = n * BT
        qc = _load_chunk(q, bk, t0, K, K, BT, ACC)
        kc = _load_chunk(k, bk, t0, K, K, BT, ACC)
        vc = _load_chunk(v, bv, t0, VT, BV, BT, ACC)
        if PER_KEY:
            Gc = _load_chunk(G, bg, t0, K, K, BT, ACC)  # (BT, K)
            Gl = _load_row(G, bg, t0 + BT - 1, K, K, ACC)  # (K,)
            oc = tl.dot(qc * tl.exp(Gc), S, input_precision="ieee")
            for j in range(BT):
                kj = _load_row(k, bk, t0 + j, K, K, ACC)
                Gj = _load_row(G, bg, t0 + j, K, K, ACC)
                vj = _load_row(v, bv, t0 + j, VT, BV, ACC)
                w = tl.exp(tl.where(offs_t[:, None] >= j, Gc - Gj[None, :], float("-inf")))
                a = tl.sum(qc * kj[None, :] * w, axis=1)  # (BT,) column j of the scores
                oc += a[:, None] * vj[None, :]
            S = S * tl.exp(Gl)[:, None] + tl.dot(tl.trans(kc * tl.exp(Gl[None, :] - Gc)), vc, input_precision="ieee")
        else:
            Gc = tl.load(G + bg + t0 + offs_t).to(ACC)  # (BT,)
            Gl = tl.load(G + bg + t0 + BT - 1).to(ACC)
            D = tl.exp(tl.where(causal, Gc[:, None] - Gc[None, :], float("-inf")))
            A = tl.dot(qc, tl.trans(kc), input_precision="ieee") * D
            oc = tl.dot(qc, S, input_precision="ieee") * tl.exp(Gc)[:, None] + tl.dot(A, vc, input_precision="ieee")
            S = S * tl.exp(Gl) + tl.dot(tl.trans(kc * tl.exp(Gl - Gc)[:, None]), vc, input_precision="ieee")
        rows = t0 + offs_t
        tl.store(o + bv + rows[:, None] * VT + offs_v[None, :], (oc * scale).to(o.dtype.element_ty))
    tl.store(hT + p_state, S.to(hT.dtype.element_ty))


@triton.jit
def _gla_bwd_kernel(
    q, k, v, G, h0, do, dhT, dq, dk, dv, dh0, scale,
    NT: tl.constexpr, K: tl.constexpr, VT: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    PER_KEY: tl.constexpr, USE_H0: tl.constexpr, ACC: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    T = NT * BT
    bk = i_bh * T * K
    bv = i_bh * T * VT + i_v * BV
    bg = i_bh * T * K if PER_KEY else i_bh * T
    bpart = i_v * tl.num_programs(1) * T * K + bk  # dq, dk: this value block's partial sums
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, K)
    offs_v = tl.arange(0, BV)
    causal = offs_t[:, None] >= offs_t[None, :]
    p_state = i_bh * K * VT + i_v * BV + offs_k[:, None] * VT + offs_v[None, :]
    # Forward sweep: recompute the chunk-start states, get dq.
    S = tl.zeros((K, BV), dtype=ACC)
    if USE_H0:
        S += tl.load(h0 + p_state).to(ACC)
    for n in range(NT):
        t0 = n * BT
        kc = _load_chunk(k, bk, t0, K, K, BT, ACC)
        vc = _load_chunk(v, bv, t0, VT, BV, BT, ACC)
        doc = _load_chunk(do, bv, t0, VT, BV, BT, ACC)
        if PER_KEY:
            Gc = _load_chunk(G, bg, t0, K, K, BT, ACC)
            Gl = _load_row(G, bg, t0 + BT - 1, K, K, ACC)
            dqc = tl.dot(doc, tl.trans(S), input_precision="ieee") * tl.exp(Gc)
            for j in range(BT):
                kj = _load_row(k, bk, t0 + j, K, K, ACC)
                Gj = _load_row(G, bg, t0 + j, K, K, ACC)
                vj = _load_row(v, bv, t0 + j, VT, BV, ACC)
                w = tl.exp(tl.where(offs_t[:, None] >= j, Gc - Gj[None, :], float("-inf")))
                da = tl.sum(doc * vj[None, :], axis=1)  # (BT,) dO_i . v_j
                dqc += da[:, None] * kj[None, :] * w
            S = S * tl.exp(Gl)[:, None] + tl.dot(tl.trans(kc * tl.exp(Gl[None, :] - Gc)), vc, input_precision="ieee")
        else:
            Gc = tl.load(G + bg + t0 + offs_t).to(ACC)
            Gl = tl.load(G + bg + t0 + BT - 1).to(ACC)
            D = tl.exp(tl.where(causal, Gc[:, None] - Gc[None, :], float("-inf")))
            dA = tl.dot(doc, tl.trans(vc), input_precision="ieee") * D
            dqc = tl.dot(doc, tl.trans(S), input_precision="ieee") * tl.exp(Gc)[:, None] + tl.dot(dA, kc, input_precision="ieee")
            S = S * tl.exp(Gl) + tl.dot(tl.trans(kc * tl.exp(Gl - Gc)[:, None]), vc, input_precision="ieee")
        rows = t0 + offs_t
        tl.store(dq + bpart + rows[:, None] * K + offs_k[None, :], (dqc * scale).to(dq.dtype.element_ty))
    # Reverse sweep: dS is the gradient of the state after the current chunk.
    dS = tl.load(dhT + p_state).to(ACC)
    for m in range(NT):
        t0 = (NT - 1 - m) * BT
        qc = _load_chunk(q, bk, t0, K, K, BT, ACC)
        kc = _load_chunk(k, bk, t0, K, K, BT, ACC)
        vc = _load_chunk(v, bv, t0, VT, BV, BT, ACC)
        doc = _load_chunk(do, bv, t0, VT, BV, BT, ACC)
        if PER_KEY:
            Gc = _load_chunk(G, bg, t0, K, K, BT, ACC)
            Gl = _load_row(G, bg, t0 + BT - 1, K, K, ACC)
            wk = tl.exp(Gl[None, :] - Gc)  # (BT, K)
            dvc = tl.dot(kc * wk, dS, input_precision="ieee")
            dkc = tl.dot(vc, tl.trans(dS), input_precision="ieee") * wk
            for i in range(BT):
                qi = _load_row(q, bk, t0 + i, K, K, ACC)
                Gi = _load_row(G, bg, t0 + i, K, K, ACC)
                doi = _load_row(do, bv, t0 + i, VT, BV, ACC)
                w = tl.exp(tl.where(offs_t[:, None] <= i, Gi[None, :] - Gc, float("-inf")))  # rows j
                a = tl.sum(kc * qi[None, :] * w, axis=1)  # (BT,) row i of the scores
                da = tl.sum(vc * doi[None, :], axis=1)  # (BT,) dO_i . v_j
                dvc += scale * a[:, None] * doi[None, :]
                dkc += scale * da[:, None] * qi[None, :] * w
            dS = dS * tl.exp(Gl)[:, None] + scale * tl.dot(tl.trans(qc * tl.exp(Gc)), doc, input_precision="ieee")
        else:
            Gc = tl.load(G + bg + t0 + offs_t).to(ACC)
            Gl = tl.load(G + bg + t0 + BT - 1).to(ACC)
            wk = tl.exp(Gl - Gc)[:, None]  # (BT, 1)
            D = tl.exp(tl.where(causal, Gc[:, None] - Gc[None, :], float("-inf")))
            A = tl.dot(qc, tl.trans(kc), input_precision="ieee") * D * scale
            dA = tl.dot(doc, tl.trans(vc), input_precision="ieee") * D * scale
            dvc = tl.dot(kc * wk, dS, input_precision="ieee") + tl.dot(tl.trans(A), doc, input_precision="ieee")
            dkc = tl.dot(vc, tl.trans(dS), input_precision="ieee") * wk + tl.dot(tl.trans(dA), qc, input_precision="ieee")
            dS = dS * tl.exp(Gl) + scale * tl.dot(tl.trans(qc * tl.exp(Gc)[:, None]), doc, input_precision="ieee")
        rows = t0 + offs_t
        tl.store(dk + bpart + rows[:, None] * K + offs_k[None, :], dkc.to(dk.dtype.element_ty))
        tl.store(dv + bv + rows[:, None] * VT + offs_v[None, :], dvc.to(dv.dtype.element_ty))
    if USE_H0:
        tl.store(dh0 + p_state, dS.to(dh0.dtype.element_ty))


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class _GLATriton(torch.autograd.Function):
    """Inputs in kernel layout: q, k ``(BH, T, K)``, v ``(BH, T, V)``, g ``(BH, T)`` or ``(BH, T, K)``,
    h0 ``(BH, K, V)`` or None; T a multiple of ``chunk``, K and V powers of two (>= 16)."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale: float, chunk: int):
        BH, T, K = q.shape
        V = v.shape[-1]
        BV = min(V, MAX_BV)
        per_key = g.dim() == 3
        G = rearrange(g, "b (n c) ... -> b n c ...", c=chunk).cumsum(2).reshape(g.shape).contiguous()
        o = torch.full_like(v, float("nan"))
        hT = torch.full((BH, K, V), float("nan"), dtype=q.dtype, device=q.device)
        _gla_fwd_kernel[(V // BV, BH)](
            q, k, v, G, h0 if h0 is not None else q, o, hT, scale,
            NT=T // chunk, K=K, VT=V, BV=BV, BT=chunk, PER_KEY=per_key, USE_H0=h0 is not None, ACC=_acc(q.dtype),
        )
        ctx.save_for_backward(q, k, v, G, h0, hT)
        ctx.scale, ctx.chunk = scale, chunk
        return o, hT

    @staticmethod
    def backward(ctx, do, dhT):
        q, k, v, G, h0, hT = ctx.saved_tensors
        BH, T, K = q.shape
        V = v.shape[-1]
        BV = min(V, MAX_BV)
        per_key = G.dim() == 3
        dq, dk = (torch.full((V // BV, *q.shape), float("nan"), dtype=q.dtype, device=q.device) for _ in range(2))
        dv = torch.full_like(v, float("nan"))
        dh0 = torch.full_like(h0, float("nan")) if h0 is not None else None
        _gla_bwd_kernel[(V // BV, BH)](
            q, k, v, G, h0 if h0 is not None else q, do.contiguous(), dhT.contiguous(), dq, dk, dv,
            dh0 if dh0 is not None else q, ctx.scale,
            NT=T // ctx.chunk, K=K, VT=V, BV=BV, BT=ctx.chunk, PER_KEY=per_key, USE_H0=h0 is not None,
            ACC=_acc(q.dtype),
        )
        dq, dk = dq.sum(0), dk.sum(0)  # (BH, T, K): add the value blocks' partial sums
        dG = q * dq - k * dk  # (BH, T, K): gradient w.r.t. the global cumulative log-decay
        if not per_key:
            dG = dG.sum(-1)  # (BH, T)
        dg = dG.flip(1).cumsum(1).flip(1)
        final = (hT * dhT).sum(-1)  # (BH, K): the final state's dependence on the total decay
        dg = dg + (final[:, None] if per_key else final.sum(-1)[:, None])
        return dq, dk, dv, dg, dh0, None, None


def gla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton GLA on a plain batch (no packing); same contract as ``chunked.gla_chunked``."""
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_gla: the triton backend needs chunk_size a power of two >= 16, got {chunk_size}.")
    B, L, H, K = q.shape
    V = v.shape[-1]
    ct = torch.promote_types(q.dtype, torch.float32)
    BK, BV = max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(V))
    pad = -L % chunk_size

    def heads(x: torch.Tensor, width: int | None) -> torch.Tensor:
        x = x.to(ct)
        if width is None:  # scalar decay (B, L, H)
            return rearrange(F.pad(x, (0, 0, 0, pad)), "b l h -> (b h) l").contiguous()
        x = F.pad(x, (0, width - x.shape[-1], 0, 0, 0, pad))
        return rearrange(x, "b l h d -> (b h) l d").contiguous()  # (BH, T, width)

    h0 = None
    if initial_state is not None:
        h0 = F.pad(initial_state.to(ct), (0, BV - V, 0, BK - K)).reshape(B * H, BK, BV).contiguous()
    o, hT = _GLATriton.apply(
        heads(q, BK), heads(k, BK), heads(v, BV), heads(g, BK if g.dim() == 4 else None), h0, scale, chunk_size
    )
    o = rearrange(o, "(b h) l d -> b l h d", b=B)[:, :L, :, :V]
    return o, hT.view(B, H, BK, BV)[:, :, :K, :V]
