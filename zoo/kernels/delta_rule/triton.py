"""Triton forward and backward of the chunked (gated) delta rule.

One program per (sequence, head, block of 32 value columns) walks the sequence chunk by chunk with its
K x BV slice of the state in registers (value columns of the delta rule evolve independently).
Per chunk it builds ``A[t, i] = beta_t exp(G_t - G_i) k_t.k_i`` (i < t), inverts ``I + A`` by forward
substitution, forms ``u = T (beta v)``, ``w = T (beta exp(G) k)``, the corrected values ``u - w S`` and the
output, then carries the state (see ``chunked.py`` for the maths). The forward saves each chunk's incoming
state; the backward walks the chunks in reverse, recomputes the per-chunk quantities from that state and
produces dq, dk, dv, dbeta, dg and d(initial_state) analytically.

Head dims of any size: the key block is the next power of two (at least 16, what ``tl.dot`` needs) and the
value block up to 32 columns, both masked to K and V. Portability (Triton 3.6 to 3.9, compiled and
interpreted): the chunk loops are ``while`` loops over a runtime chunk count (Triton 3.6's interpreter cannot
take ``range()`` of a runtime bound under NumPy 2.4) and no length-dependent argument is specialised, so one
compile serves every sequence length; masks are comparisons of block tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_chunk(q, k, v, beta, g, t, m, h, rk, mk, rv, mv, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                HAS_G: tl.constexpr, ACC: tl.constexpr):
    """One chunk's rows ``t`` (valid where ``m``): q, k ``(C, BK)``, v ``(C, BV)``, beta and g ``(C,)``, zero-padded."""
    mqk = m[:, None] & mk[None, :]
    mvv = m[:, None] & mv[None, :]
    bq = tl.load(q + (t[:, None] * H + h) * K + rk[None, :], mask=mqk, other=0.0).to(ACC)
    bk = tl.load(k + (t[:, None] * H + h) * K + rk[None, :], mask=mqk, other=0.0).to(ACC)
    bv = tl.load(v + (t[:, None] * H + h) * V + rv[None, :], mask=mvv, other=0.0).to(ACC)
    bb = tl.load(beta + t * H + h, mask=m, other=0.0).to(ACC)
    if HAS_G:
        bg = tl.load(g + t * H + h, mask=m, other=0.0).to(ACC)
    else:
        bg = tl.zeros_like(bb)
    return bq, bk, bv, bb, bg


@triton.jit
def _chunk_terms(bk, bb, bg, C: tl.constexpr):
    """Decays, the strictly-lower A and T = (I + A)^-1 of one chunk."""
    rc = tl.arange(0, C)
    le = rc[:, None] >= rc[None, :]
    lt = rc[:, None] > rc[None, :]
    G = tl.cumsum(bg, 0)
    Dm = tl.where(le, tl.exp(tl.where(le, G[:, None] - G[None, :], 0.0)), 0.0)  # exp(G_t - G_i), i <= t
    KK = tl.dot(bk, tl.trans(bk))
    A = tl.where(lt, bb[:, None] * Dm * KK, 0.0)
    Ti = tl.zeros_like(A)
    for i in range(C):  # forward substitution, row i: T[i] = e_i - A[i] T
        a_i = tl.sum(tl.where(rc[:, None] == i, A, 0.0), 0)
        row = tl.where(rc == i, 1.0, 0.0) - tl.sum(a_i[:, None] * Ti, 0)
        Ti = tl.where(rc[:, None] == i, row[None, :], Ti)
    gL = tl.sum(tl.where(rc == C - 1, G, 0.0), 0)
    return G, Dm, KK, A, Ti, gL


@triton.jit
def _state_tile(iv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """This program's ``(BK, BV)`` tile of the ``K x V`` state: key and value indices, their masks, offsets and mask."""
    rk = tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    return rk, rv, mk, mv, rk[:, None] * V + rv[None, :], mk[:, None] & mv[None, :]


@triton.jit
def _fwd_kernel(q, k, v, beta, g, h0, o, ht, hs, cu, co, scale,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                HAS_G: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, ACC: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    iv = tl.program_id(2)  # value columns evolve independently: each program owns BV of them
    bos = tl.load(cu + n)
    eos = tl.load(cu + n + 1)
    c0 = tl.load(co + n)
    rc = tl.arange(0, C)
    rk, rv, mk, mv, s_off, s_m = _state_tile(iv, K, V, BK, BV)
    S = tl.zeros((BK, BV), dtype=ACC)
    if HAS_H0:
        S = tl.load(h0 + (n * H + h) * K * V + s_off, mask=s_m, other=0.0).to(ACC)
    nch = tl.cdiv(eos - bos, C)
    c = 0
    while c < nch:  # a while loop: the interpreter cannot take a runtime bound in range()
        t = bos + c * C + rc
        m = t < eos
        bq, bk, bv, bb, bg = _load_chunk(q, k, v, beta, g, t, m, h, rk, mk, rv, mv, H, K, V, HAS_G, ACC)
        tl.store(hs + ((c0 + c) * H + h) * K * V + s_off, S, mask=s_m)
        G, Dm, KK, A, Ti, gL = _chunk_terms(bk, bb, bg, C)
        gam = tl.exp(G)
        u = tl.dot(Ti, bb[:, None] * bv)
        w = tl.dot(Ti, (bb * gam)[:, None] * bk)
        vn = u - tl.dot(w, S)  # corrected values (C, V)
        P = tl.dot(bq, tl.trans(bk)) * Dm
        ob = scale * (gam[:, None] * tl.dot(bq, S) + tl.dot(P, vn))
        tl.store(o + (t[:, None] * H + h) * V + rv[None, :], ob.to(o.dtype.element_ty), mask=m[:, None] & mv[None, :])
        kd = bk * tl.exp(gL - G)[:, None]
        S = tl.exp(gL) * S + tl.dot(tl.trans(kd), vn)
        c += 1
    if STORE_HT:
        tl.store(ht + (n * H + h) * K * V + s_off, S, mask=s_m)


@triton.jit(do_not_specialize=["n_tok"])
def _bwd_kernel(q, k, v, beta, g, hs, do, dht, dq, dk, dv, dbeta, dg, dh0, cu, co, scale, n_tok,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                HAS_G: tl.constexpr, HAS_DHT: tl.constexpr, HAS_H0: tl.constexpr, ACC: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    # dq, dk, dbeta, dg are sums over value columns: each V block writes its own partial slice.
    dq = dq + iv * n_tok * H * K
    dk = dk + iv * n_tok * H * K
    dbeta = dbeta + iv * n_tok * H
    dg = dg + iv * n_tok * H
    bos = tl.load(cu + n)
    eos = tl.load(cu + n + 1)
    c0 = tl.load(co + n)
    rc = tl.arange(0, C)
    rk, rv, mk, mv, s_off, s_m = _state_tile(iv, K, V, BK, BV)
    lt = rc[:, None] > rc[None, :]
    dS = tl.zeros((BK, BV), dtype=ACC)
    if HAS_DHT:
        dS = tl.load(dht + (n * H + h) * K * V + s_off, mask=s_m, other=0.0).to(ACC)
    nch = tl.cdiv(eos - bos, C)
    c = nch - 1
    while c >= 0:
        t = bos + c * C + rc
        m = t < eos
        bq, bk, bv, bb, bg = _load_chunk(q, k, v, beta, g, t, m, h, rk, mk, rv, mv, H, K, V, HAS_G, ACC)
        S = tl.load(hs + ((c0 + c) * H + h) * K * V + s_off, mask=s_m, other=0.0).to(ACC)
        G, Dm, KK, A, Ti, gL = _chunk_terms(bk, bb, bg, C)
        gam = tl.exp(G)
        bv_b = bb[:, None] * bv
        bk_b = (bb * gam)[:, None] * bk
        u = tl.dot(Ti, bv_b)
        w = tl.dot(Ti, bk_b)
        vn = u - tl.dot(w, S)
        QK = tl.dot(bq, tl.trans(bk))
        P = QK * Dm
        E = tl.exp(gL - G)
        kd = bk * E[:, None]
        bdo = scale * tl.load(do + (t[:, None] * H + h) * V + rv[None, :], mask=m[:, None] & mv[None, :],
                              other=0.0).to(ACC)
        # o = gam * (q S) + P vn ; S_out = exp(gL) S + kd^T vn
        dvn = tl.dot(tl.trans(P), bdo) + tl.dot(kd, dS)
        dP = tl.dot(bdo, tl.trans(vn))
        dgam = tl.sum(bdo * tl.dot(bq, S), 1)
        dgL = tl.sum(tl.sum(S * dS, 1), 0) * tl.exp(gL)
        dS_prev = tl.exp(gL) * dS + tl.dot(tl.trans(bq * gam[:, None]), bdo) - tl.dot(tl.trans(w), dvn)
        dPm = dP * Dm
        b_dq = gam[:, None] * tl.dot(bdo, tl.trans(S)) + tl.dot(dPm, bk)
        b_dk = tl.dot(tl.trans(dPm), bq)
        dD = dP * QK
        dkd = tl.dot(vn, tl.trans(dS))
        b_dk += dkd * E[:, None]
        dEE = tl.sum(dkd * bk, 1) * E
        # u = T (beta v), w = T (beta gam k), vn = u - w S
        dbv = tl.dot(tl.trans(Ti), dvn)
        dbk = tl.dot(tl.trans(Ti), -tl.dot(dvn, tl.trans(S)))
        dA = tl.where(lt, -(tl.dot(dbv, tl.trans(u)) + tl.dot(dbk, tl.trans(w))), 0.0)
        b_dv = bb[:, None] * dbv
        b_db = tl.sum(dbv * bv, 1) + tl.sum(dbk * gam[:, None] * bk, 1) + tl.sum(dA * Dm * KK, 1)
        b_dk += (bb * gam)[:, None] * dbk
        dgam += tl.sum(dbk * bb[:, None] * bk, 1)
        dKK = dA * bb[:, None] * Dm
        dD += dA * bb[:, None] * KK
        b_dk += tl.dot(dKK + tl.trans(dKK), bk)
        R = dD * Dm
        dG = dgam * gam + tl.sum(R, 1) - tl.sum(R, 0) - dEE
        dG += tl.where(rc == C - 1, dgL + tl.sum(dEE, 0), 0.0)
        b_dg = tl.sum(dG, 0) - tl.cumsum(dG, 0) + dG  # suffix sums: g enters every later G
        mqk = m[:, None] & mk[None, :]
        tl.store(dq + (t[:, None] * H + h) * K + rk[None, :], b_dq.to(dq.dtype.element_ty), mask=mqk)
        tl.store(dk + (t[:, None] * H + h) * K + rk[None, :], b_dk.to(dk.dtype.element_ty), mask=mqk)
        tl.store(dv + (t[:, None] * H + h) * V + rv[None, :], b_dv.to(dv.dtype.element_ty), mask=m[:, None] & mv[None, :])
        tl.store(dbeta + t * H + h, b_db.to(dbeta.dtype.element_ty), mask=m)
        if HAS_G:
            tl.store(dg + t * H + h, b_dg.to(dg.dtype.element_ty), mask=m)
        dS = dS_prev
        c -= 1
    if HAS_H0:
        tl.store(dh0 + (n * H + h) * K * V + s_off, dS.to(dh0.dtype.element_ty), mask=s_m)


def _layout(B: int, L: int, cu_seqlens: torch.Tensor | None, C: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sequence starts ``cu (N+1,)`` over the flattened tokens and chunk offsets ``co (N+1,)``."""
    cu = torch.arange(B + 1, device=device) * L if cu_seqlens is None else cu_seqlens.to(device=device, dtype=torch.long)
    n_chunks = (cu[1:] - cu[:-1] + C - 1) // C
    co = torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])
    return cu.contiguous(), co.contiguous(), int(co[-1])


class _ChunkDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, scale, cu_seqlens, chunk_size, output_final_state):
        B, L, H, K = q.shape
        V = v.shape[-1]
        acc_t = torch.promote_types(q.dtype, torch.float32)
        acc = tl.float64 if acc_t == torch.float64 else tl.float32
        cu, co, n_chunks = _layout(B, L, cu_seqlens, chunk_size, q.device)
        N = cu.numel() - 1
        q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
        gc = g.contiguous() if g is not None else beta
        o = torch.full((B, L, H, V), float("nan"), dtype=q.dtype, device=q.device)
        hs = torch.empty(n_chunks, H, K, V, dtype=acc_t, device=q.device)  # each chunk's incoming state
        ht = torch.empty(N, H, K, V, dtype=acc_t, device=q.device) if output_final_state else hs
        h0c = h0.contiguous() if h0 is not None else hs
        BK, BV = _blocks(K, V)
        _fwd_kernel[(N, H, triton.cdiv(V, BV))](
            q, k, v, beta, gc, h0c, o, ht, hs, cu, co, scale, H=H, K=K, V=V, BK=BK, BV=BV, C=chunk_size,
            HAS_G=g is not None, HAS_H0=h0 is not None, STORE_HT=output_final_state, ACC=acc,
        )
        ctx.save_for_backward(q, k, v, beta, g, h0, hs, cu, co)
        ctx.scale, ctx.C, ctx.acc = scale, chunk_size, acc
        return o, (ht if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, h0, hs, cu, co = ctx.saved_tensors
        B, L, H, K = q.shape
        V = v.shape[-1]
        N = cu.numel() - 1
        BK, BV = _blocks(K, V)
        NV = triton.cdiv(V, BV)

        def nan_buffer(*shape, dtype):
            return torch.full(shape, float("nan"), dtype=dtype, device=q.device)

        acc_t = hs.dtype
        dq, dk = nan_buffer(NV, B, L, H, K, dtype=acc_t), nan_buffer(NV, B, L, H, K, dtype=acc_t)  # partial per V block
        dbeta, dg = nan_buffer(NV, B, L, H, dtype=acc_t), nan_buffer(NV, B, L, H, dtype=acc_t)
        dv = nan_buffer(B, L, H, V, dtype=v.dtype)
        dh0 = nan_buffer(*h0.shape, dtype=h0.dtype) if h0 is not None else hs
        do = do.contiguous() if do is not None else torch.zeros(B, L, H, V, dtype=q.dtype, device=q.device)
        dhtc = dht.contiguous() if dht is not None else hs
        _bwd_kernel[(N, H, NV)](
            q, k, v, beta, g if g is not None else beta, hs, do, dhtc, dq, dk, dv, dbeta, dg, dh0, cu, co, ctx.scale,
            B * L, H=H, K=K, V=V, BK=BK, BV=BV, C=ctx.C, HAS_G=g is not None, HAS_DHT=dht is not None,
            HAS_H0=h0 is not None, ACC=ctx.acc,
        )
        dq, dk, dbeta = dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dbeta.sum(0).to(beta.dtype)
        dg = dg.sum(0).to(g.dtype) if g is not None else None
        return dq, dk, dv, dbeta, dg, (dh0 if h0 is not None else None), None, None, None, None


_BLOCK_V = 32  # value columns per program (the recurrence never mixes value columns)


def _blocks(K: int, V: int) -> tuple[int, int]:
    """Key block (all of K) and value block: powers of two, at least 16 (``tl.dot``), masked to K and V."""
    return max(16, triton.next_power_of_2(K)), min(_BLOCK_V, max(16, triton.next_power_of_2(V)))


def chunk_delta_rule_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton chunked delta rule (forward and analytic backward); same contract as ``chunk_delta_rule``.

    Any head sizes K and V (masked blocks); ``chunk_size`` must be a power of two >= 16."""
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(
            f"chunk_delta_rule: backend 'triton' needs chunk_size to be a power of two >= 16, got {chunk_size}; "
            "pass e.g. chunk_size=64 or use backend='torch'."
        )
    return _ChunkDeltaRule.apply(q, k, v, beta, g, initial_state, scale, cu_seqlens, chunk_size, output_final_state)
