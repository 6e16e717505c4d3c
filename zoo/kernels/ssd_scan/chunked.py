"""Chunked SSD (Mamba-2) in pure torch, sharing the group's B and C across its heads.

``chunk_gla`` with q = C, k = B repeated to every head would form ``C B^T`` and scale q, k once per head. Here,
inside each chunk of ``c`` steps (``G`` the chunk-local cumulative log-decay ``dt * A`` of a head):

- intra-chunk: ``y_t = sum_{s <= t} (C_t . B_s) exp(G_t - G_s) v_s`` with ``v = x * dt``; ``C B^T`` is one
  ``c x c`` matmul per group, only the decay mask is per head;
- chunk states: ``kv = B^T (exp(G_last - G) v)``, one matmul per group with the group's heads side by side in the
  columns (``n x (heads * p)``);
- across chunks the ``(n, p)`` state of each head is carried by :func:`zoo.kernels.gla.chunked.inter_chunk_states`
  (hand-written backward, linear in the chunk count), and ``exp(G_t) C_t . S_start`` is again one matmul per group.

All in float32 (float64 for float64 inputs); L is zero-padded to a multiple of the chunk (dt = 0 there: decay 1
and input 0, the state passes through). Packed documents run as a zero-padded batch, as in ``chunk_gla``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.kernels._compile import run_compiled, use_compiled
from zoo.kernels._dispatch import TILE_BYTES as _TILE_BYTES
from zoo.kernels.gla.chunked import inter_chunk_states
from zoo.packing import from_padded_batch, packed_index, to_padded_batch

TILE_BYTES = _TILE_BYTES  # the largest (b, chunks, h, c, c) intra-chunk tensor of one tile of chunks
#: Tiles whose (b, chunks, h, c, c) decay has at least this many elements run the intra-chunk part compiled on CPU
#: (``zoo.kernels._compile``: the masked exp, the decay times C B^T and their backward fused; the matmuls stay BLAS).
COMPILE_MIN_ELEMENTS = 1 << 20


def _intra_tile(Gh, Cg, Bg, vt, tri, g: int, hg: int) -> torch.Tensor:
    if use_compiled("ssd", Gh, Gh.numel() * Gh.shape[-1], COMPILE_MIN_ELEMENTS):  # Gh needs grad in training
        out = run_compiled("ssd", "intra", _intra, Gh, Cg, Bg, vt, tri, g, hg)
        if out is not None:
            return out
    return _intra(Gh, Cg, Bg, vt, tri, g, hg)


def _intra(Gh, Cg, Bg, vt, tri, g: int, hg: int) -> torch.Tensor:
    """Intra-chunk outputs of a tile of chunks: Gh ``(b, t, h, c)``, Cg/Bg ``(b, t, g, c, n)``, vt ``(b, t, h, c, p)``."""
    b, t, h, c = Gh.shape
    decay = (Gh[..., :, None] - Gh[..., None, :]).masked_fill_(~tri, float("-inf")).exp_()  # (b, t, h, c, c)
    M = decay.view(b, t, g, hg, c, c) * (Cg @ Bg.transpose(-1, -2))[:, :, :, None]
    return M.view(b, t, h, c, c) @ vt  # (b, t, h, c, p)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD without the D skip (validated inputs, layouts of :func:`zoo.kernels.ssd`).

    Returns y ``(b, l, h, p)`` and the final state ``(b|N, h, p, n)``, both in the compute dtype.
    """
    ct = torch.promote_types(x.dtype, torch.float32)
    packed = cu_seqlens is not None
    if packed:
        seq, pos, lmax = packed_index(cu_seqlens)
        x, dt, B, C = (to_padded_batch(t, seq, pos, cu_seqlens.numel() - 1, lmax) for t in (x, dt, B, C))
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    hg = h // g
    S0 = initial_state.to(ct).transpose(-1, -2) if initial_state is not None else x.new_zeros(b, h, n, p, dtype=ct)
    if l == 0:  # nothing to scan: the state passes through
        y, final = x.new_zeros(b, 0, h, p, dtype=ct), S0
    else:
        c = chunk_size
        pad = -l % c
        nc = (l + pad) // c

        def prep(t: torch.Tensor) -> torch.Tensor:  # (b, l, ...) -> (b, nc, c, ...)
            t = F.pad(t.to(ct), (0, 0) * (t.dim() - 2) + (0, pad))
            return t.view(b, nc, c, *t.shape[2:])

        xc, dtc, Bc, Cc = prep(x), prep(dt), prep(B), prep(C)  # (b,nc,c,h,p) (b,nc,c,h) (b,nc,c,g,n) x2
        G = (dtc * A.to(ct)).cumsum(2)  # (b, nc, c, h)
        Gl = G[:, :, -1]  # (b, nc, h)
        v = xc * dtc[..., None]  # (b, nc, c, h, p)
        Bg, Cg = Bc.transpose(2, 3), Cc.transpose(2, 3)  # (b, nc, g, c, n)

        # Intra-chunk: (C B^T per group) * (decay per head), masked before exp; in tiles of chunks so that no
        # (b, chunks, h, c, c) tensor outgrows TILE_BYTES (fresh buffers past glibc's mmap threshold cost page
        # faults on every call). split/cat keep the backward one gather and one scatter per input.
        Gh = G.transpose(2, 3)  # (b, nc, h, c)
        tri = torch.ones(c, c, dtype=torch.bool, device=x.device).tril()
        per_chunk = b * h * c * c * torch.empty((), dtype=ct).element_size()
        t = max(1, min(nc, TILE_BYTES // per_chunk))
        vt = v.transpose(2, 3)  # (b, nc, h, c, p)
        parts = [_intra_tile(*ts, tri, g, hg) for ts in zip(*(z.split(t, dim=1) for z in (Gh, Cg, Bg, vt)))]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (b, nc, h, c, p)

        # Each chunk's own contribution to the state, heads of a group side by side: (b, nc, g, n, hg * p).
        W = (v * (Gl[:, :, None] - G).exp()[..., None]).view(b, nc, c, g, hg * p).transpose(2, 3)
        kv = (Bg.transpose(-1, -2) @ W).view(b, nc, g, n, hg, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h, nc, n, p)
        starts, final = inter_chunk_states(kv, Gl.exp().transpose(1, 2)[..., None, None], S0)  # (b, h, nc, n, p)

        # Inter-chunk: exp(G_t) C_t . S_start, one matmul per group.
        Sg = starts.view(b, g, hg, nc, n, p).permute(0, 3, 1, 4, 2, 5).reshape(b, nc, g, n, hg * p)
        y_in = (Cg @ Sg).view(b, nc, g, c, hg, p) * G.exp().view(b, nc, c, g, hg).transpose(2, 3)[..., None]
        y = y.view(b, nc, g, hg, c, p).permute(0, 1, 4, 2, 3, 5) + y_in.transpose(2, 3)  # (b, nc, c, g, hg, p)
        y = y.reshape(b, nc * c, h, p)[:, :l]
    if packed:
        y = from_padded_batch(y, seq, pos)
    return y, final.transpose(-1, -2)
