"""Gated linear attention in chunked form: the fast pure-torch path.

Inside a chunk of ``C`` steps the output is a masked attention-like product with decay
``exp(G_i - G_j)`` (``G`` the chunk-local cumulative log-decay, ``j <= i``); across chunks a K x V state
is carried with the chunk's total decay. The only Python loop is the one over chunks.

Per-key-dim decays are factored as ``(q_i e^{G_i - G_0}) . (k_j e^{G_0 - G_j})`` (one matmul) only when every
chunk's decay span ``max G - min G`` is at most ``SAFE_SPAN``, so no factor can overflow or underflow in
float32 (the product of two exactly rounded factors is as accurate as the direct form). Otherwise the chunk
is cut into sub-chunks of 16: diagonal sub-blocks use the exact exponent differences (masked before
``exp``), and an off-diagonal block (query sub-chunk a > key sub-chunk b) uses as reference the cumulative
decay at the end of sub-chunk b, which makes both factors ``exp(G_i - G_ref)`` and ``exp(G_ref - G_j)`` at most 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from zoo.kernels._dispatch import TILE_BYTES as _TILE_BYTES

SUB_CHUNK = 16
SAFE_SPAN = 30.0  # e^30 ~ 1e13: far from float32 overflow (3e38) and underflow (1e-38)


def _intra_scalar(q: torch.Tensor, k: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Scores ``sum_d q_i k_j exp(G_i - G_j)`` for ``j <= i``; q, k ``(..., C, K)``, G ``(..., C)`` -> ``(..., C, C)``."""
    C = G.shape[-1]
    tri = torch.ones(C, C, dtype=torch.bool, device=G.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~tri, float("-inf")).exp()  # (..., C, C)
    return (q @ k.transpose(-1, -2)) * decay


def _intra_per_key(q: torch.Tensor, k: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Same scores with per-key-dim decay, G ``(..., C, K)``: factored when safe, else by sub-chunks (module doc)."""
    C, K = G.shape[-2:]
    if float((G.amax(-2) - G.amin(-2)).max().detach()) <= SAFE_SPAN:  # factor through the chunk's first step
        G0 = G[..., :1, :]
        tri = torch.ones(C, C, dtype=torch.bool, device=G.device).tril()
        A = (q * (G - G0).exp()) @ (k * (G0 - G).exp()).transpose(-1, -2)  # (..., C, C)
        return A.masked_fill(~tri, 0.0)
    c = SUB_CHUNK if C % SUB_CHUNK == 0 else C
    ns = C // c
    qs, ks, Gs = (rearrange(t, "... (s c) k -> ... s c k", c=c) for t in (q, k, G))  # (..., ns, c, K)
    dev = G.device
    # Diagonal sub-blocks: exact differences, masked before exp.
    tri = torch.ones(c, c, dtype=torch.bool, device=dev).tril()
    diff = (Gs[..., :, None, :] - Gs[..., None, :, :]).masked_fill(~tri[..., None], float("-inf"))  # (..., ns, c, c, K)
    a_diag = (qs[..., :, None, :] * ks[..., None, :, :] * diff.exp()).sum(-1)  # (..., ns, c, c)
    # Off-diagonal sub-blocks: reference point at the end of the key sub-chunk.
    ref = Gs[..., :, -1, :]  # (..., ns, K)
    kt = ks * (ref[..., None, :] - Gs).exp()  # (..., ns_b, c, K), factors <= 1
    lower = torch.ones(ns, ns, dtype=torch.bool, device=dev).tril(-1)
    expo = Gs[..., :, None, :, :] - ref[..., None, :, None, :]  # (..., ns_a, ns_b, c, K)
    qt = expo.masked_fill(~lower[:, :, None, None], float("-inf")).exp() * qs[..., :, None, :, :]
    a_off = torch.einsum("...abik,...bjk->...abij", qt, kt)  # (..., ns_a, ns_b, c, c)
    eye = torch.eye(ns, dtype=torch.bool, device=dev)[:, :, None, None]
    A = torch.where(eye, a_diag[..., :, None, :, :], a_off)
    return rearrange(A, "... a b i j -> ... (a i) (b j)")  # (..., C, C)


TILE_BYTES = _TILE_BYTES  # the largest intra-chunk score tensor of one tile of chunks


def _intra_outputs(q, k, v, G, scale: float) -> torch.Tensor:
    """``(A * scale) @ v`` of every chunk, in tiles of chunks: q, k ``(B, H, N, C, K)``, v ``(B, H, N, C, V)``, G
    ``(B, H, N, C[, K])``. No tile's scores (``(.., C, C)``, and the per-key sub-chunk path's ``(.., C, 16, K)``)
    outgrow TILE_BYTES: fresh buffers past glibc's mmap threshold cost page faults on every call. split/cat keep
    the backward one gather and one scatter per input."""
    B, H, N, C, K = q.shape
    per_key = G.dim() == 5
    per_chunk = B * H * C * (C + (SUB_CHUNK * K if per_key else 0)) * q.element_size()
    t = max(1, min(N, TILE_BYTES // per_chunk))
    intra = _intra_per_key if per_key else _intra_scalar
    outs = [(intra(qt, kt, Gt) * scale) @ vt for qt, kt, vt, Gt in zip(*(x.split(t, dim=2) for x in (q, k, v, G)))]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class _InterChunk(torch.autograd.Function):
    """The state recurrence across chunks, ``S_{n+1} = d_n * S_n + kv_n``, with a hand-written reverse recurrence.

    Under plain autograd, indexing chunk n of a saved ``(B, H, N, K, V)`` tensor makes each index's backward
    zero-fill the whole tensor: O(N^2) memory traffic. Here forward and backward each walk the chunks once,
    writing chunk slabs of preallocated outputs in place.
    """

    @staticmethod
    def forward(ctx, kv, decay, S0):
        # kv (B, H, N, K, V); decay (B, H, N, K|1, 1); S0 (B, H, K, V)
        starts = torch.empty_like(kv)
        S = S0
        for n in range(kv.shape[2]):
            starts[:, :, n] = S
            S = torch.addcmul(kv[:, :, n], decay[:, :, n], S)
        ctx.save_for_backward(decay, starts)
        return starts, S

    @staticmethod
    def backward(ctx, d_starts, d_final):
        decay, starts = ctx.saved_tensors
        N = starts.shape[2]
        d_kv = torch.empty_like(starts)
        per_key = decay.shape[-2] != 1
        sum_dims = (-1,) if per_key else (-2, -1)
        d_decay = torch.empty_like(decay)
        gS = d_final if d_final is not None else starts.new_zeros(starts[:, :, 0].shape)  # dLoss/dS_{n+1}
        for n in reversed(range(N)):
            d_kv[:, :, n] = gS
            d_decay[:, :, n] = (gS * starts[:, :, n]).sum(sum_dims, keepdim=True)
            gS = gS * decay[:, :, n] if d_starts is None else torch.addcmul(d_starts[:, :, n], decay[:, :, n], gS)
        return d_kv, d_decay, gS


def inter_chunk_states(kv: torch.Tensor, decay: torch.Tensor, S0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """States entering each chunk and the final state of ``S_{n+1} = decay_n * S_n + kv_n`` (``S_0 = S0``).

    kv ``(B, H, N, K, V)``, decay ``(B, H, N, K, 1)`` or ``(B, H, N, 1, 1)``, S0 ``(B, H, K, V)``. Returns
    ``starts (B, H, N, K, V)`` (``starts[:, :, n] = S_n``) and ``S_N``. Forward and backward are linear in N.
    """
    return _InterChunk.apply(kv, decay, S0)


def gla_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked GLA on a plain batch (no packing). Returns o ``(B, L, H, V)`` and the final state ``(B, H, K, V)``.

    Computes in float32 (float64 for float64 inputs); L is zero-padded to a multiple of ``chunk_size``
    (a padded step has decay 1 and input 0, so it leaves the state unchanged).
    """
    B, L, H, K = q.shape
    V = v.shape[-1]
    ct = torch.promote_types(q.dtype, torch.float32)
    C = chunk_size
    pad = -L % C

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.to(ct)
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return rearrange(x, "b (n c) h ... -> b h n c ...", c=C)

    q, k, v, g = prep(q), prep(k), prep(v), prep(g)  # (B, H, N, C, ...)
    G = g.cumsum(3)  # chunk-local inclusive cumulative log-decay
    if g.dim() == 4:  # scalar decay per head
        Gl = G[..., -1]  # (B, H, N)
        q_in = q * G.exp()[..., None]
        k_st = k * (Gl[..., None] - G).exp()[..., None]
        chunk_decay = Gl.exp()[..., None, None]  # (B, H, N, 1, 1)
    else:
        Gl = G[..., -1, :]  # (B, H, N, K)
        q_in = q * G.exp()
        k_st = k * (Gl[..., None, :] - G).exp()
        chunk_decay = Gl.exp()[..., None]  # (B, H, N, K, 1)
    o = _intra_outputs(q, k, v, G, scale)  # (B, H, N, C, V)
    kv = k_st.transpose(-1, -2) @ v  # (B, H, N, K, V): each chunk's own contribution to the state
    S0 = initial_state.to(ct) if initial_state is not None else q.new_zeros(B, H, K, V)
    starts, S = inter_chunk_states(kv, chunk_decay, S0)  # (B, H, N, K, V), (B, H, K, V)
    o = o + (q_in * scale) @ starts  # (B, H, N, C, V)
    o = rearrange(o, "b h n c v -> b (n c) h v")[:, :L]
    return o, S
