"""The Mamba-1 selective scan as a plain sequential recurrence: the oracle every fast path is tested against.

``h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t``, ``y_t = C_t . h_t + D * u_t``, ``out = y * silu(z)``
with ``dt = softplus(delta + delta_bias)`` when ``delta_softplus``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.kernels._dispatch import compute_dtype
from zoo.packing import sequence_starts


def selective_scan_ref(
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequential selective scan; same arguments as :func:`zoo.kernels.selective_scan`."""
    f = compute_dtype(u.dtype)
    Bsz, E, L = u.shape
    N = A.shape[-1]
    uf, dt = u.to(f), delta.to(f)
    if delta_bias is not None:
        dt = dt + delta_bias.to(f)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    Bg, Cg = (t[:, None].to(f) if t.dim() == 3 else t.to(f) for t in (B, C))  # (B, G, N, L)
    rep = E // Bg.shape[1]
    Be, Ce = Bg.repeat_interleave(rep, dim=1), Cg.repeat_interleave(rep, dim=1)  # (B, E, N, L)
    h = initial_state.to(f) if initial_state is not None else uf.new_zeros(Bsz, E, N)
    starts = sequence_starts(cu_seqlens, L).tolist() if cu_seqlens is not None else [False] * L
    Af = A.to(f)
    ys = []
    for t in range(L):
        if starts[t]:
            h = torch.zeros_like(h)
        h = torch.exp(dt[:, :, t, None] * Af) * h + (dt[:, :, t] * uf[:, :, t])[..., None] * Be[..., t]
        ys.append((h * Ce[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)  # (B, E, L)
    if D is not None:
        y = y + uf * D.to(f)[:, None]
    if z is not None:
        y = y * F.silu(z.to(f))
    out = y.to(u.dtype)
    return (out, h) if return_last_state else out

