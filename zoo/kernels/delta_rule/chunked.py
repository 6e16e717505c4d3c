"""Chunked (WY / UT-transform) form of the (gated) delta rule in pure torch.

Inside a chunk of C tokens with in-chunk cumulative log-decay ``G`` and carried-in state ``S0``, the
delta rule's corrected values ``v~_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t)`` solve the unit lower
triangular system ``(I + A) v~ = beta v - (beta exp(G) k) S0`` with
``A[t, i] = beta_t exp(G_t - G_i) k_t.k_i`` (i < t). With ``T = (I + A)^-1`` (inverted by block recursion over
batched matmuls, forward substitution inside 16-row blocks), ``u = T (beta v)`` and
``w = T (beta exp(G) k)`` are computed for every chunk at once; only the K x K state update
``S <- (exp(G_C) I - kd^T w) S + kd^T u`` (``kd_i = exp(G_C - G_i) k_i``) runs in a Python loop, one
iteration per chunk. Sequences (batch rows or packed ``cu_seqlens`` pieces) are cut into chunks that never
cross a boundary; chunk columns are processed for all sequences still running, so work is linear in tokens.
"""

from __future__ import annotations

import torch

from zoo.kernels._dispatch import TILE_BYTES as _TILE_BYTES


def _unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """``(I + A)^-1`` for strictly lower-triangular ``A (..., n, n)``, by 2x2 block recursion.

    ``[[I + A11, 0], [A21, I + A22]]^-1 = [[T11, 0], [-T22 A21 T11, T22]]``; blocks of <= 16 rows use forward
    substitution. Batched matmuls only: much faster on CPU than a batched triangular solve.
    """
    n = A.shape[-1]
    if n <= 16:
        eye = torch.eye(n, dtype=A.dtype, device=A.device).expand(A.shape)
        rows = [eye[..., :1, :]]
        for i in range(1, n):  # row i: e_i - A[i, :i] T[:i]
            rows.append(eye[..., i : i + 1, :] - A[..., i : i + 1, :i] @ torch.cat(rows, -2))
        return torch.cat(rows, -2)
    h = n // 2
    T11, T22 = _unit_lower_inverse(A[..., :h, :h]), _unit_lower_inverse(A[..., h:, h:])
    T21 = -(T22 @ A[..., h:, :h]) @ T11
    top = torch.cat([T11, A.new_zeros(*A.shape[:-2], h, n - h)], -1)
    return torch.cat([top, torch.cat([T21, T22], -1)], -2)


def _chunk_layout(cu: torch.Tensor, chunk_size: int, total: int):
    """Index maps between packed tokens and chunk slots.

    Returns ``idx (Nc*C,)`` token index per slot (``T`` = a zero dummy row for padding slots), ``order``
    (sequences sorted by chunk count, descending) and ``counts[j]`` = sequences with more than j chunks.
    Chunks are ordered column by column: chunk j of every running sequence, then chunk j + 1.
    ``total`` is the number of tokens (``cu[-1]``, passed from the shapes rather than read from the tensor).
    """
    lens = cu[1:] - cu[:-1]
    nch = (lens + chunk_size - 1) // chunk_size  # (N,)
    order = torch.sort(nch, descending=True, stable=True).indices
    nch_sorted = nch[order]
    max_ch = int(nch_sorted[0]) if nch.numel() else 0
    running = nch_sorted[None, :] > torch.arange(max_ch, device=cu.device)[:, None]  # (max_ch, N)
    j, r = running.nonzero(as_tuple=True)
    seq = order[r]
    pos = cu[seq, None] + j[:, None] * chunk_size + torch.arange(chunk_size, device=cu.device)  # (Nc, C)
    idx = torch.where(pos < cu[seq + 1, None], pos, torch.full_like(pos, total)).reshape(-1)
    return idx, order, running.sum(1).tolist()


TILE_BYTES = _TILE_BYTES  # the largest (chunks, H, C, C) tensor of one tile of chunks


def _intra_chunk(kc, vc, bc, gc, le, lt, eye):
    """Per-chunk quantities of a tile of chunks: ``G``, ``D = exp(G_t - G_i)`` (i <= t), ``(u, w)``, and the
    state transition ``trans (t, H, K, K)`` and injection ``inject (t, H, K, V)`` of each chunk."""
    V = vc.shape[-1]
    G = gc.cumsum(-1)  # (t, H, C)
    D = (G[..., :, None] - G[..., None, :]).masked_fill(~le, float("-inf")).exp()  # (t, H, C, C), exp(G_t - G_i), i <= t
    A = (bc[..., :, None] * D * (kc @ kc.transpose(-1, -2))).masked_fill(~lt, 0.0)
    rhs = torch.cat([bc[..., None] * vc, (bc * G.exp())[..., None] * kc], dim=-1)  # (t, H, C, V + K)
    uw = _unit_lower_inverse(A) @ rhs
    u, w = uw[..., :V], uw[..., V:]  # (t, H, C, V), (t, H, C, K)
    g_last = G[..., -1]  # (t, H)
    kd = kc * (g_last[..., None] - G).exp()[..., None]  # (t, H, C, K)
    trans = g_last.exp()[..., None, None] * eye - kd.transpose(-1, -2) @ w  # (t, H, K, K)
    inject = kd.transpose(-1, -2) @ u  # (t, H, K, V)
    return G, D, (u, w), trans, inject


def chunk_delta_rule_torch(
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
    """Chunked delta rule; same arguments and results as ``delta_rule_reference`` (compute in >= float32)."""
    B, L, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    dt = torch.promote_types(q.dtype, torch.float32)
    dev = q.device
    if cu_seqlens is None:
        cu = torch.arange(B + 1, device=dev) * L
    else:
        cu = cu_seqlens.to(device=dev, dtype=torch.long)
    if g is None:
        g = beta.new_zeros(beta.shape)
    idx, order, counts = _chunk_layout(cu, C, B * L)
    Nc = idx.numel() // C

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(B * L, H, x.shape[-1]).to(dt)
        flat = torch.cat([flat, flat.new_zeros(1, H, flat.shape[-1])])  # dummy zero row for padding
        return flat[idx].reshape(Nc, C, H, flat.shape[-1]).transpose(1, 2)  # (Nc, H, C, *)

    qc, kc, vc = to_chunks(q * scale), to_chunks(k), to_chunks(v)
    bc, gc = to_chunks(beta[..., None])[..., 0], to_chunks(g[..., None])[..., 0]  # (Nc, H, C)

    le = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
    lt = le.tril(-1)
    eye = torch.eye(K, dtype=dt, device=dev)
    # Tiles of chunks: no (chunks, H, C, C) tensor outgrows TILE_BYTES (fresh buffers past glibc's mmap threshold
    # cost page faults on every call). split/cat keep the backward one gather and one scatter per input.
    t = max(1, min(Nc, TILE_BYTES // max(1, H * C * C * torch.empty((), dtype=dt).element_size())))
    tiles = list(zip(*(x.split(t) for x in (qc, kc, vc, bc, gc))))
    firsts = [_intra_chunk(kt, vt, bt, gt, le, lt, eye) for _, kt, vt, bt, gt in tiles]
    trans = torch.cat([f[3] for f in firsts]) if len(firsts) > 1 else firsts[0][3]  # (Nc, H, K, K)
    inject = torch.cat([f[4] for f in firsts]) if len(firsts) > 1 else firsts[0][4]  # (Nc, H, K, V)

    N = cu.numel() - 1
    cur = initial_state.to(dt)[order] if initial_state is not None else q.new_zeros(N, H, K, V, dtype=dt)
    starts = []
    for n, tr, inj in zip(counts, trans.split(counts), inject.split(counts)):  # one iteration per chunk column
        s_in = cur[:n]
        starts.append(s_in)
        cur = torch.cat([tr @ s_in + inj, cur[n:]])
    S_in = torch.cat(starts) if starts else q.new_zeros(0, H, K, V, dtype=dt)  # (Nc, H, K, V)

    outs = []
    for (qt, kt, _, _, _), (G, D, (u, w), _, _), St in zip(tiles, firsts, S_in.split(t)):
        v_new = u - w @ St  # (t, H, C, V)
        P = (qt @ kt.transpose(-1, -2)) * D
        outs.append(G.exp()[..., None] * (qt @ St) + P @ v_new)  # (t, H, C, V)
    o = torch.cat(outs) if len(outs) > 1 else outs[0]  # (Nc, H, C, V)

    o = o.transpose(1, 2).reshape(Nc * C, H, V)
    slot = torch.empty(B * L + 1, dtype=torch.long, device=dev)
    slot[idx] = torch.arange(Nc * C, device=dev)
    o = o[slot[: B * L]].reshape(B, L, H, V).to(q.dtype)
    final = None
    if output_final_state:
        final = cur[torch.argsort(order)]
    return o, final
