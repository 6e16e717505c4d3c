"""Direct (quadratic) long convolution: the float64 oracle for :func:`zoo.kernels.fft_conv`."""

from __future__ import annotations

import torch


def fft_conv_ref(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """``y[t] = sum_s k[t - s] u[s] + D u[t]`` computed tap by tap.

    u ``(B, H, L)``; k ``(H, Lk)`` or ``(C, H, Lk)``. ``Lk <= L`` is a causal kernel (lag j at index j);
    ``Lk == 2L`` is two-sided: lag ``j >= 0`` at index j and lag ``-j`` at index ``2L - j``.
    Returns ``(B, H, L)`` or ``(B, C, H, L)``.
    """
    L = u.shape[-1]
    kk = k if k.dim() == 3 else k[None]  # (C, H, Lk)
    Lk = kk.shape[-1]
    uu = u[:, None]  # (B, 1, H, L)
    y = uu.new_zeros(u.shape[0], kk.shape[0], u.shape[1], L)  # (B, C, H, L)
    for j in range(min(Lk, L)):  # causal lags: y[t] += k[j] u[t - j]
        y[..., j:] += kk[None, :, :, j, None] * uu[..., : L - j]
    if Lk == 2 * L:
        for j in range(1, L):  # anticausal lags: y[t] += k[2L - j] u[t + j]
            y[..., : L - j] += kk[None, :, :, 2 * L - j, None] * uu[..., j:]
    if D is not None:
        y = y + (D if D.dim() == 2 else D[None])[None, :, :, None] * uu
    return y if k.dim() == 3 else y[:, 0]
