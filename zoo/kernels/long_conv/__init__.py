"""``fft_conv``: long convolution through the FFT, the core of S4's convolutional mode.

There is no Triton version: ``torch.fft`` already calls cuFFT on GPU (and pocketfft on CPU), which a
hand-written Triton FFT would not beat, so ``backend`` accepts only ``None`` and ``"torch"``.
"""

from __future__ import annotations

import torch

from zoo.kernels._dispatch import TILE_BYTES as _TILE_BYTES

__all__ = ["fft_conv"]


def fft_conv(
    u: torch.Tensor,
    k: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``irfft(rfft(u, 2L) * rfft(k, 2L))[:L] + D u``: causal (or two-sided) convolution of u with k.

    u ``(B, H, L)``; k ``(H, Lk)`` or with channels ``(C, H, Lk)``, where ``Lk <= L`` is a causal kernel and
    ``Lk == 2L`` a two-sided one (lag ``-j`` at index ``2L - j``; build it as
    ``pad(k0, (0, L)) + pad(flip(k1), (L, 0))``). D ``(H,)`` or ``(C, H)``.
    Returns ``(B, H, L)``, or ``(B, C, H, L)`` with channels, in u's dtype (the FFT runs in at least float32).
    """
    if backend not in (None, "torch"):
        raise ValueError(
            f"fft_conv: there is no {backend!r} kernel (torch.fft already uses cuFFT on GPU); pass backend=None or 'torch'."
        )
    if u.dim() != 3:
        raise ValueError(f"fft_conv: u must be (batch, channels H, length L); got shape {tuple(u.shape)}.")
    B, H, L = u.shape
    if k.dim() not in (2, 3) or k.shape[-2] != H:
        raise ValueError(f"fft_conv: k must be ({H}, Lk) or (C, {H}, Lk) to match u's {H} channels; got {tuple(k.shape)}.")
    Lk = k.shape[-1]
    if Lk > L and Lk != 2 * L:
        raise ValueError(
            f"fft_conv: kernel length {Lk} must be <= L={L} (causal) or exactly 2L={2 * L} (two-sided); truncate or rebuild it."
        )
    if D is not None and tuple(D.shape) != tuple(k.shape[:-1]):
        raise ValueError(f"fft_conv: D must have shape {tuple(k.shape[:-1])} (one skip weight per kernel); got {tuple(D.shape)}.")
    ct = torch.promote_types(torch.promote_types(u.dtype, k.dtype), torch.float32)
    # Channel tiles: every FFT intermediate (its backward's complex (rows, 2L) buffer the largest) stays under
    # TILE_BYTES, so long sequences reuse heap memory instead of mapping fresh pages on every call. split/cat
    # (not indexing) keep the backward one gather and one scatter, whatever the tile count.
    rows = u.shape[0] * (k.shape[0] if k.dim() == 3 else 1)
    per_channel = rows * 2 * L * 2 * torch.empty((), dtype=ct).element_size()
    tile = max(1, min(H, TILE_BYTES // max(per_channel, 1)))
    if tile >= H:
        y = _fft_conv(u, k, D, ct)
    else:
        Ds = D.split(tile, dim=-1) if D is not None else [None] * -(-H // tile)
        y = torch.cat([_fft_conv(ut, kt, Dt, ct) for ut, kt, Dt in zip(u.split(tile, dim=1), k.split(tile, dim=-2), Ds)],
                      dim=-2)
    return y.to(u.dtype)


TILE_BYTES = _TILE_BYTES  # the largest FFT buffer of one channel tile


def _fft_conv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None, ct: torch.dtype) -> torch.Tensor:
    """``irfft(rfft(u, 2L) * (rfft(k, 2L) + D))[:L]`` in ``ct``: u ``(B, h, L)``, k ``(h, Lk)`` or ``(C, h, Lk)``.

    The skip ``D u`` is a tap at lag 0, whose spectrum is D at every frequency: added to the kernel's spectrum it
    costs no full-size temporaries (forward or backward)."""
    L = u.shape[-1]
    n = 2 * L
    uf = torch.fft.rfft(u.to(ct), n=n)  # (B, h, L+1)
    kf = torch.fft.rfft(k.to(ct), n=n)  # (h|C,h, L+1)
    if D is not None:
        kf = kf + D.to(ct)[..., None]
    if k.dim() == 3:
        uf = uf[:, None]  # (B, 1, h, L+1)
    return torch.fft.irfft(uf * kf, n=n)[..., :L]  # (B, [C,] h, L)
