"""The Mamba-2 recurrence one step at a time: the oracle for :func:`zoo.kernels.ssd`.

Per head h with group ``h // (H / G)``: ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t + D x_t``.
"""

from __future__ import annotations

import torch


def ssd_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential SSD in the inputs' dtype (float64 for an oracle); same layouts as :func:`zoo.kernels.ssd`.

    x ``(b, l, h, p)``, dt ``(b, l, h)``, A ``(h,)``, B, C ``(b, l, g, n)``, D ``(h,)`` or None,
    initial_state ``(b, h, p, n)``. Returns y ``(b, l, h, p)`` and the final state ``(b, h, p, n)``.
    """
    b, l, h, p = x.shape
    rep = h // B.shape[2]
    state = initial_state if initial_state is not None else x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(l):
        Bt, Ct = B[:, t].repeat_interleave(rep, 1), C[:, t].repeat_interleave(rep, 1)  # (b, h, n)
        state = (dt[:, t] * A).exp()[..., None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None]
        ys.append((state * Ct[:, :, None]).sum(-1) + (D[:, None] * x[:, t] if D is not None else 0))
    return torch.stack(ys, 1), state
