"""Gated linear attention in Triton: a chunked forward kernel and a chunked backward kernel.

One program per (value block, batch, head) walks the chunks in order with its BK x BV slice of the state in
registers (value columns are independent; dq and dk are summed over the value blocks afterwards). The kernels
read q, k, v in their ``(B, L, H, D)`` layout; the head dims are padded to blocks of a power of two (at least
16, what ``tl.dot`` needs) by masking, and the last chunk is masked to the sequence length, so no input is
copied or padded on the host.
Scalar decay: the intra-chunk part is two ``tl.dot`` with the masked decay matrix ``exp(G_i - G_j)``.
Per-key-dim decay: the intra-chunk part loops over the chunk's rows and uses the exact masked
``exp(G_i - G_j)`` per key dim, which never overflows (no ``exp(-G)`` factorisation).

The backward kernel recomputes the states in a forward sweep (giving dq), then walks the chunks in reverse
with the state gradient (giving dk, dv and d initial_state). The decay gradient follows from the identity
``dG_t = q_t * dq_t - k_t * dk_t`` for the global cumulative log-decay ``G``, plus ``sum_v S_T * dS_T`` at the
last step; ``dg`` is the reverse cumulative sum of ``dG`` over time.

Portability (Triton 3.6 to 3.9, compiled and interpreted): the chunk loops are ``while`` loops over a runtime
chunk count (Triton 3.6's interpreter cannot take ``range()`` of a runtime bound under NumPy 2.4) and the
length is not specialised, so one compile serves every sequence length; masks are comparisons of block
tensors (a broadcast scalar bool is not a valid mask in Triton 3.9's interpreter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from einops import rearrange

MAX_BV = 64  # value columns per program: the state a program holds is BK x MAX_BV


@triton.jit
def _load_tile(ptr, base, t0, T, stride, cols, mcols, BT: tl.constexpr, ACC: tl.constexpr):
    """Rows ``t0 .. t0 + BT`` (zero past ``T``) and the masked columns ``cols`` of a ``(T, stride)`` view."""
    rows = t0 + tl.arange(0, BT)
    m = (rows < T)[:, None] & mcols[None, :]
    return tl.load(ptr + base + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=m, other=0.0).to(ACC)


@triton.jit
def _store_tile(ptr, base, t0, T, stride, cols, mcols, x, BT: tl.constexpr):
    rows = t0 + tl.arange(0, BT)
    m = (rows < T)[:, None] & mcols[None, :]
    tl.store(ptr + base + rows[:, None].to(tl.int64) * stride + cols[None, :], x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _load_row(ptr, base, t, T, stride, cols, mcols, W: tl.constexpr, ACC: tl.constexpr):
    """Row ``t`` (zero when ``t >= T``) of a ``(T, stride)`` view, ``W`` columns."""
    rows = tl.full([W], t, tl.int64)  # t may be a plain int (first loop pass in the interpreter)
    return tl.load(ptr + base + rows * stride + cols, mask=mcols & (rows < T), other=0.0).to(ACC)


@triton.jit
def _decay_tiles(G, bg, t0, T, H, K, offs_t, offs_k, mask_k,
                 BT: tl.constexpr, BK: tl.constexpr, PER_KEY: tl.constexpr, ACC: tl.constexpr):
    """Chunk-local cumulative log-decay of one chunk, and its last valid row ``Gl``.

    Rows past ``T`` take ``Gl`` (a zero log-decay there), so no difference ``G_i - G_j`` with ``j <= i``
    is positive and no ``exp`` overflows in the masked rows."""
    t_last = tl.minimum(t0 + BT, T) - 1
    valid = (t0 + offs_t) < T
    if PER_KEY:
        Gl = tl.load(G + bg + t_last.to(tl.int64) * H * K + offs_k, mask=mask_k, other=0.0).to(ACC)  # (BK,)
        Gc = _load_tile(G, bg, t0, T, H * K, offs_k, mask_k, BT, ACC)  # (BT, BK)
        Gc = tl.where(valid[:, None], Gc, Gl[None, :])
    else:
        Gl = tl.load(G + bg + t_last.to(tl.int64) * H).to(ACC)
        Gc = tl.load(G + bg + (t0 + offs_t).to(tl.int64) * H, mask=valid, other=0.0).to(ACC)  # (BT,)
        Gc = tl.where(valid, Gc, Gl)
    return Gc, Gl


@triton.jit(do_not_specialize=["T"])
def _gla_fwd_kernel(
    q, k, v, G, h0, o, hT, scale, T, H, K, V,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    PER_KEY: tl.constexpr, USE_H0: tl.constexpr, ACC: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bk = i_b.to(tl.int64) * T * H * K + i_h * K  # q, k row t of this head: bk + t * H * K
    bv = i_b.to(tl.int64) * T * H * V + i_h * V  # v, o
    bg = bk if PER_KEY else i_b.to(tl.int64) * T * H + i_h
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    causal = offs_t[:, None] >= offs_t[None, :]
    p_state = i_bh.to(tl.int64) * K * V + offs_k[:, None] * V + offs_v[None, :]
    m_state = mask_k[:, None] & mask_v[None, :]
    S = tl.zeros((BK, BV), dtype=ACC)
    if USE_H0:
        S += tl.load(h0 + p_state, mask=m_state, other=0.0).to(ACC)
    NT = tl.cdiv(T, BT)
    n = 0
    while n < NT:
        t0 = n * BT
        qc = _load_tile(q, bk, t0, T, H * K, offs_k, mask_k, BT, ACC)
        kc = _load_tile(k, bk, t0, T, H * K, offs_k, mask_k, BT, ACC)
        vc = _load_tile(v, bv, t0, T, H * V, offs_v, mask_v, BT, ACC)
        Gc, Gl = _decay_tiles(G, bg, t0, T, H, K, offs_t, offs_k, mask_k, BT, BK, PER_KEY, ACC)
        if PER_KEY:
            oc = tl.dot(qc * tl.exp(Gc), S, input_precision="ieee")
            for j in range(BT):
                kj = _load_row(k, bk, t0 + j, T, H * K, offs_k, mask_k, BK, ACC)
                Gj = tl.sum(tl.where(offs_t[:, None] == j, Gc, 0.0), axis=0)  # row j of the chunk's decays
                vj = _load_row(v, bv, t0 + j, T, H * V, offs_v, mask_v, BV, ACC)
                w = tl.exp(tl.where(offs_t[:, None] >= j, Gc - Gj[None, :], float("-inf")))
                a = tl.sum(qc * kj[None, :] * w, axis=1)  # (BT,) column j of the scores
                oc += a[:, None] * vj[None, :]
            S = S * tl.exp(Gl)[:, None] + tl.dot(tl.trans(kc * tl.exp(Gl[None, :] - Gc)), vc, input_precision="ieee")
        else:
            D = tl.exp(tl.where(causal, Gc[:, None] - Gc[None, :], float("-inf")))
            A = tl.dot(qc, tl.trans(kc), input_precision="ieee") * D
            oc = tl.dot(qc, S, input_precision="ieee") * tl.exp(Gc)[:, None] + tl.dot(A, vc, input_precision="ieee")
            S = S * tl.exp(Gl) + tl.dot(tl.trans(kc * tl.exp(Gl - Gc)[:, None]), vc, input_precision="ieee")
        _store_tile(o, bv, t0, T, H * V, offs_v, mask_v, oc * scale, BT)
        n += 1
    tl.store(hT + p_state, S.to(hT.dtype.element_ty), mask=m_state)


@triton.jit(do_not_specialize=["T"])
def _gla_bwd_kernel(
    q, k, v, G, h0, do, dhT, dq, dk, dv, dh0, scale, T, H, K, V,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    PER_KEY: tl.constexpr, USE_H0: tl.constexpr, ACC: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bk = i_b.to(tl.int64) * T * H * K + i_h * K
    bv = i_b.to(tl.int64) * T * H * V + i_h * V
    bg = bk if PER_KEY else i_b.to(tl.int64) * T * H + i_h
    bpart = i_v.to(tl.int64) * tl.num_programs(1) * T * K + bk  # dq, dk: this value block's partial sums
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    causal = offs_t[:, None] >= offs_t[None, :]
    p_state = i_bh.to(tl.int64) * K * V + offs_k[:, None] * V + offs_v[None, :]
    m_state = mask_k[:, None] & mask_v[None, :]
    NT = tl.cdiv(T, BT)
    # Forward sweep: recompute the chunk-start states, get dq.
    S = tl.zeros((BK, BV), dtype=ACC)
    if USE_H0:
        S += tl.load(h0 + p_state, mask=m_state, other=0.0).to(ACC)
    n = 0
    while n < NT:
        t0 = n * BT
        kc = _load_tile(k, bk, t0, T, H * K, offs_k, mask_k, BT, ACC)
        vc = _load_tile(v, bv, t0, T, H * V, offs_v, mask_v, BT, ACC)
        doc = _load_tile(do, bv, t0, T, H * V, offs_v, mask_v, BT, ACC)
        Gc, Gl = _decay_tiles(G, bg, t0, T, H, K, offs_t, offs_k, mask_k, BT, BK, PER_KEY, ACC)
        if PER_KEY:
            dqc = tl.dot(doc, tl.trans(S), input_precision="ieee") * tl.exp(Gc)
            for j in range(BT):
                kj = _load_row(k, bk, t0 + j, T, H * K, offs_k, mask_k, BK, ACC)
                Gj = tl.sum(tl.where(offs_t[:, None] == j, Gc, 0.0), axis=0)
                vj = _load_row(v, bv, t0 + j, T, H * V, offs_v, mask_v, BV, ACC)
                w = tl.exp(tl.where(offs_t[:, None] >= j, Gc - Gj[None, :], float("-inf")))
                da = tl.sum(doc * vj[None, :], axis=1)  # (BT,) dO_i . v_j
                dqc += da[:, None] * kj[None, :] * w
            S = S * tl.exp(Gl)[:, None] + tl.dot(tl.trans(kc * tl.exp(Gl[None, :] - Gc)), vc, input_precision="ieee")
        else:
            D = tl.exp(tl.where(causal, Gc[:, None] - Gc[None, :], float("-inf")))
            dA = tl.dot(doc, tl.trans(vc), input_precision="ieee") * D
            dqc = tl.dot(doc, tl.trans(S), input_precision="ieee") * tl.exp(Gc)[:, None] + tl.dot(dA, kc, input_precision="ieee")
            S = S * tl.exp(Gl) + tl.dot(tl.trans(kc * tl.exp(Gl - Gc)[:, None]), vc, input_precision="ieee")
        _store_tile(dq, bpart, t0, T, H * K, offs_k, mask_k, dqc * scale, BT)
        n += 1
    # Reverse sweep: dS is the gradient of the state after the current chunk.
    dS = tl.load(dhT + p_state, mask=m_state, other=0.0).to(ACC)
    n = NT - 1
    while n >= 0:
        t0 = n * BT
        qc = _load_tile(q, bk, t0, T, H * K, offs_k, mask_k, BT, ACC)
        kc = _load_tile(k, bk, t0, T, H * K, offs_k, mask_k, BT, ACC)
        vc = _load_tile(v, bv, t0, T, H * V, offs_v, mask_v, BT, ACC)
        doc = _load_tile(do, bv, t0, T, H * V, offs_v, mask_v, BT, ACC)
        Gc, Gl = _decay_tiles(G, bg, t0, T, H, K, offs_t, offs_k, mask_k, BT, BK, PER_KEY, ACC)
        if PER_KEY:
            wk = tl.exp(Gl[None, :] - Gc)  # (BT, BK)
            dvc = tl.dot(kc * wk, dS, input_precision="ieee")
            dkc = tl.dot(vc, tl.trans(dS), input_precision="ieee") * wk
            for i in range(BT):
                qi = _load_row(q, bk, t0 + i, T, H * K, offs_k, mask_k, BK, ACC)
                Gi = tl.sum(tl.where(offs_t[:, None] == i, Gc, 0.0), axis=0)
                doi = _load_row(do, bv, t0 + i, T, H * V, offs_v, mask_v, BV, ACC)
                w = tl.exp(tl.where(offs_t[:, None] <= i, Gi[None, :] - Gc, float("-inf")))  # rows j
                a = tl.sum(kc * qi[None, :] * w, axis=1)  # (BT,) row i of the scores
                da = tl.sum(vc * doi[None, :], axis=1)  # (BT,) dO_i . v_j
                dvc += scale * a[:, None] * doi[None, :]
                dkc += scale * da[:, None] * qi[None, :] * w
            dS = dS * tl.exp(Gl)[:, None] + scale * tl.dot(tl.trans(qc * tl.exp(Gc)), doc, input_precision="ieee")
        else:
            wk = tl.exp(Gl - Gc)[:, None]  # (BT, 1)
            D = tl.exp(tl.where(causal, Gc[:, None] - Gc[None, :], float("-inf")))
            A = tl.dot(qc, tl.trans(kc), input_precision="ieee") * D * scale
            dA = tl.dot(doc, tl.trans(vc), input_precision="ieee") * D * scale
            dvc = tl.dot(kc * wk, dS, input_precision="ieee") + tl.dot(tl.trans(A), doc, input_precision="ieee")
            dkc = tl.dot(vc, tl.trans(dS), input_precision="ieee") * wk + tl.dot(tl.trans(dA), qc, input_precision="ieee")
            dS = dS * tl.exp(Gl) + scale * tl.dot(tl.trans(qc * tl.exp(Gc)[:, None]), doc, input_precision="ieee")
        _store_tile(dk, bpart, t0, T, H * K, offs_k, mask_k, dkc, BT)
        _store_tile(dv, bv, t0, T, H * V, offs_v, mask_v, dvc, BT)
        n -= 1
    if USE_H0:
        tl.store(dh0 + p_state, dS.to(dh0.dtype.element_ty), mask=m_state)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(K: int, V: int) -> tuple[int, int]:
    """Key block (all of K) and value block: powers of two, at least 16 (``tl.dot``), masked to K and V."""
    return max(16, triton.next_power_of_2(K)), min(MAX_BV, max(16, triton.next_power_of_2(V)))


def chunk_cumsum(g: torch.Tensor, chunk: int) -> torch.Tensor:
    """Cumulative sum of ``g (B, L, H[, K])`` over time, restarting at every chunk of ``chunk`` steps."""
    L = g.shape[1]
    pad = -L % chunk
    gp = F.pad(g, (0, 0) * (g.dim() - 2) + (0, pad))
    return rearrange(gp, "b (n c) ... -> b n c ...", c=chunk).cumsum(2).flatten(1, 2)[:, :L]


class _GLATriton(torch.autograd.Function):
    """q, k ``(B, L, H, K)``, v ``(B, L, H, V)``, g ``(B, L, H)`` or ``(B, L, H, K)``, h0 ``(B, H, K, V)`` or None,
    all contiguous; returns o in v's dtype and the final state in the accumulation dtype."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale: float, chunk: int):
        B, T, H, K = q.shape
        V = v.shape[-1]
        BK, BV = _blocks(K, V)
        ct = torch.promote_types(q.dtype, torch.float32)
        G = chunk_cumsum(g.to(ct), chunk).contiguous()
        o = torch.full_like(v, float("nan"))
        hT = torch.full((B, H, K, V), float("nan"), dtype=ct, device=q.device)
        _gla_fwd_kernel[(triton.cdiv(V, BV), B * H)](
            q, k, v, G, h0 if h0 is not None else hT, o, hT, scale, T, H, K, V,
            BK=BK, BV=BV, BT=chunk, PER_KEY=g.dim() == 4, USE_H0=h0 is not None, ACC=_acc(ct),
        )
        ctx.save_for_backward(q, k, v, G, h0, hT)
        ctx.scale, ctx.chunk, ctx.g_dtype = scale, chunk, g.dtype
        return o, hT

    @staticmethod
    def backward(ctx, do, dhT):
        q, k, v, G, h0, hT = ctx.saved_tensors
        B, T, H, K = q.shape
        V = v.shape[-1]
        BK, BV = _blocks(K, V)
        NV = triton.cdiv(V, BV)
        per_key = G.dim() == 4
        ct = hT.dtype
        dq, dk = (torch.full((NV, B, T, H, K), float("nan"), dtype=ct, device=q.device) for _ in range(2))
        dv = torch.full((B, T, H, V), float("nan"), dtype=ct, device=q.device)
        dh0 = torch.full((B, H, K, V), float("nan"), dtype=ct, device=q.device) if h0 is not None else None
        _gla_bwd_kernel[(NV, B * H)](
            q, k, v, G, h0 if h0 is not None else hT, do.contiguous(), dhT.contiguous(), dq, dk, dv,
            dh0 if dh0 is not None else hT, ctx.scale, T, H, K, V,
            BK=BK, BV=BV, BT=ctx.chunk, PER_KEY=per_key, USE_H0=h0 is not None, ACC=_acc(ct),
        )
        dq, dk = dq.sum(0), dk.sum(0)  # (B, T, H, K): add the value blocks' partial sums
        dG = q * dq - k * dk  # gradient w.r.t. the global cumulative log-decay
        if not per_key:
            dG = dG.sum(-1)  # (B, T, H)
        dg = dG.flip(1).cumsum(1).flip(1)
        final = (hT * dhT).sum(-1)  # (B, H, K): the final state's dependence on the total decay
        dg = dg + (final[:, None] if per_key else final.sum(-1)[:, None])
        return (
            dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(ctx.g_dtype),
            None if dh0 is None else dh0.to(h0.dtype), None, None,
        )


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
    """Triton GLA on a plain batch (no packing); same contract as ``chunked.gla_chunked``. Any head sizes."""
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_gla: the triton backend needs chunk_size a power of two >= 16, got {chunk_size}.")
    ct = torch.promote_types(q.dtype, torch.float32)
    h0 = initial_state.to(ct).contiguous() if initial_state is not None else None
    return _GLATriton.apply(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), h0, scale, chunk_size)
