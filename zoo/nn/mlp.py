"""Feed-forward blocks: SwiGLU and GELU MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden(d_model: int, multiple_of: int = 256) -> int:
    """~8/3 * d_model rounded up to ``multiple_of`` (for small widths, to a multiple of 8)."""
    h = int(8 * d_model / 3)
    m = multiple_of if d_model >= 512 else 8
    return m * ((h + m - 1) // m)


class SwiGLU(nn.Module):
    """``W2(silu(W1 x) * W3 x)``."""

    def __init__(self, d_model: int, hidden: int | None = None, bias: bool = False) -> None:
        super().__init__()
        hidden = hidden or swiglu_hidden(d_model)
        self.w1 = nn.Linear(d_model, hidden, bias=bias)
        self.w3 = nn.Linear(d_model, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    """``W2(gelu(W1 x))`` with hidden 4 * d_model by default."""

    def __init__(self, d_model: int, hidden: int | None = None, bias: bool = True) -> None:
        super().__init__()
        hidden = hidden or 4 * d_model
        self.w1 = nn.Linear(d_model, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


MLP_KINDS = ("swiglu", "gelu", "none", "moe")


def build_mlp(kind: str, d_model: int, *, hidden: int | None = None, moe: dict | None = None) -> nn.Module:
    """The MLP of a block by kind name (``none`` is handled by the caller: no MLP)."""
    if kind == "swiglu":
        return SwiGLU(d_model, hidden)
    if kind == "gelu":
        return GeluMLP(d_model, hidden)
    if kind == "moe":
        from zoo.nn.moe import MoE

        return MoE(d_model, hidden=hidden, **(moe or {}))
    raise ValueError(f"unknown mlp kind {kind!r}; choose one of {', '.join(MLP_KINDS)}.")
