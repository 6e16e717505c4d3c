"""Rotary position embeddings (RoPE), rotate-half convention."""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    """Cos/sin tables for positions; ``apply_rotary`` rotates q/k ``(B, L, H, K)``."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim}.")
        # No buffer: from_pretrained builds models on the meta device and would leave a non-persistent one empty.
        self.dim, self.base = dim, base

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions (B, L)`` or ``(L,)`` -> cos, sin of shape ``(B|1, L, 1, dim)`` in float32."""
        if positions.dim() == 1:
            positions = positions[None]
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=positions.device, dtype=torch.float32) / self.dim))
        freqs = positions.float()[..., None] * inv_freq  # (B, L, dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x (B, L, H, K)``."""
    d = cos.shape[-1]
    xr, xp = x[..., :d], x[..., d:]
    out = (xr.float() * cos + rotate_half(xr.float()) * sin).to(x.dtype)
    return torch.cat([out, xp], dim=-1) if xp.shape[-1] else out
