"""Short causal depthwise convolution (width 4 in Mamba / MoM) with a one-step update.

The convolution itself is :func:`zoo.kernels.causal_conv1d` (one causal conv in the zoo); this
module holds the parameters in the ``(E, W)`` layout and carries the conv state.
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.kernels import causal_conv1d, causal_conv1d_update
from zoo.packing import last_inputs


class ShortConv(nn.Module):
    """Depthwise causal conv of width ``kernel_size`` with optional SiLU, as in Mamba / MoM."""

    def __init__(self, dim: int, kernel_size: int = 4, bias: bool = True, activation: str | None = "silu") -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"short conv kernel_size must be >= 1, got {kernel_size}.")
        if activation not in (None, "silu", "swish"):
            raise ValueError(f"short conv activation must be None or 'silu', got {activation!r}.")
        self.dim, self.kernel_size, self.activation = dim, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(dim, kernel_size))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(
        self,
        x: torch.Tensor,
        *,
        state: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``(B, L, E)`` -> y ``(B, L, E)``, new state ``(B, E, W-1)`` (``(N, E, W-1)`` per packed document).

        Padded inputs (``mask`` 0) count as zeros and are skipped by the carried state.
        """
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        y = causal_conv1d(
            x.transpose(1, 2), self.weight, self.bias, self.activation,
            initial_states=None if state is None else state.to(x.dtype), cu_seqlens=cu_seqlens, backend=backend,
        )
        new_state = last_inputs(x, self.kernel_size - 1, prev=state, mask=mask, cu_seqlens=cu_seqlens)
        return y.transpose(1, 2), new_state

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token ``x (B, E)`` with state ``(B, E, W-1)`` -> ``y (B, E)``, new state."""
        return causal_conv1d_update(x, state.to(x.dtype), self.weight, self.bias, self.activation)
