"""The Mamba-1 selective scan as a plain sequential recurrence: the oracle every fast path is tested against.

``h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t``, ``y_t = C_t . h_t + D * u_t``, ``out = y * silu(z)``
with ``dt = softplus(delta + delta_bias)`` when ``delta_softplus``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.packing import sequence_starts


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (half-precision inputs accumulate in float32)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def grouped(BC: torch.Tensor) -> torch.Tensor:
    """``(B, N, L)`` -> ``(B, 1, N, L)``; ``(B, G, N, L)`` unchanged."""
    return BC[:, None] if BC.dim() == 3 else BC


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
    f = compute_dtype(u)
    Bsz, E, L = u.shape
    N = A.shape[-1]
    uf, dt = u.to(f), delta.to(f)
    if delta_bias is not None:
        dt = dt + delta_bias.to(f)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    Bg, Cg = grouped(B).to(f), grouped(C).to(f)  # (B, G, N, L)
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


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of the selective scan.

    state ``(B, E, N)``, x / dt / z ``(B, E)``, A ``(E, N)``, B / C ``(B, N)`` or ``(B, G, N)``, D / dt_bias ``(E,)``.
    Returns ``out (B, E)`` in x's dtype and the new state (state's dtype). Unlike mamba_ssm's function the
    state is not modified in place, so autograd and beam search can keep the old one.
    """
    if state.dim() != 3 or x.shape != state.shape[:2] or dt.shape != x.shape or A.shape != state.shape[1:]:
        raise ValueError(
            f"selective_state_update: expected state (B, E, N), x and dt (B, E), A (E, N); got state "
            f"{tuple(state.shape)}, x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}."
        )
    f = torch.float64 if state.dtype == torch.float64 else torch.float32
    E = x.shape[1]
    dtf = dt.to(f)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(f)
    if dt_softplus:
        dtf = F.softplus(dtf)
    Bg = B[:, None] if B.dim() == 2 else B  # (B, G, N)
    Cg = C[:, None] if C.dim() == 2 else C
    if E % Bg.shape[1]:
        raise ValueError(f"selective_state_update: {Bg.shape[1]} groups of B/C must divide the {E} channels.")
    Be = Bg.to(f).repeat_interleave(E // Bg.shape[1], dim=1)  # (B, E, N)
    Ce = Cg.to(f).repeat_interleave(E // Cg.shape[1], dim=1)
    xf = x.to(f)
    h = torch.exp(dtf[..., None] * A.to(f)) * state.to(f) + (dtf * xf)[..., None] * Be
    y = (h * Ce).sum(-1)  # (B, E)
    if D is not None:
        y = y + xf * D.to(f)
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(x.dtype), h.to(state.dtype)
