"""Feed-forward blocks: SwiGLU and GELU MLPs, optionally tiled over the tokens for long sequences."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def swiglu_hidden(d_model: int, multiple_of: int = 256) -> int:
    """~8/3 * d_model rounded up to ``multiple_of`` (for small widths, to a multiple of 8)."""
    h = int(8 * d_model / 3)
    m = multiple_of if d_model >= 512 else 8
    return m * ((h + m - 1) // m)


class _TokenwiseMLP(nn.Module, metaclass=ABCMeta):
    """An MLP acting on each token alone; with ``chunk_size`` > 0 it runs ``chunk_size`` tokens at a time.

    Its hidden activations (2-4x d_model per token, several of them saved for backward) then exist for one tile
    only: in training each tile is checkpointed (only its input is kept; the tile is recomputed in backward).
    Tokens are rows of the flattened batch, so outputs and gradients equal the untiled MLP.
    """

    chunk_size: int = 0

    @abstractmethod
    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP on ``x (..., d_model)``: what each subclass computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.chunk_size
        if n <= 0 or x.numel() // x.shape[-1] <= n:
            return self._mlp(x)
        flat = x.reshape(-1, x.shape[-1])  # (B * L, D)
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        tiles = [
            checkpoint(self._mlp, t, use_reentrant=False) if grad else self._mlp(t) for t in flat.split(n)
        ]
        return torch.cat(tiles).reshape(x.shape)


class SwiGLU(_TokenwiseMLP):
    """``W2(silu(W1 x) * W3 x)``."""

    def __init__(self, d_model: int, hidden: int | None = None, bias: bool = False, chunk_size: int = 0) -> None:
        super().__init__()
        hidden = hidden or swiglu_hidden(d_model)
        self.w1 = nn.Linear(d_model, hidden, bias=bias)
        self.w3 = nn.Linear(d_model, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, d_model, bias=bias)
        self.chunk_size = chunk_size

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(_TokenwiseMLP):
    """``W2(gelu(W1 x))`` with hidden 4 * d_model by default."""

    def __init__(self, d_model: int, hidden: int | None = None, bias: bool = True, chunk_size: int = 0) -> None:
        super().__init__()
        hidden = hidden or 4 * d_model
        self.w1 = nn.Linear(d_model, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, d_model, bias=bias)
        self.chunk_size = chunk_size

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


MLP_KINDS = ("swiglu", "gelu", "none", "moe")


def build_mlp(
    kind: str, d_model: int, *, hidden: int | None = None, moe: dict | None = None, chunk_size: int = 0
) -> nn.Module:
    """The MLP of a block by kind name (``none`` is handled by the caller: no MLP).

    ``chunk_size``: tokens per tile for the dense MLPs (0: untiled); a MoE routes all tokens at once and is not tiled.
    """
    if kind == "swiglu":
        return SwiGLU(d_model, hidden, chunk_size=chunk_size)
    if kind == "gelu":
        return GeluMLP(d_model, hidden, chunk_size=chunk_size)
    if kind == "moe":
        from zoo.nn.moe import MoE

        return MoE(d_model, hidden=hidden, **(moe or {}))
    raise ValueError(f"unknown mlp kind {kind!r}; choose one of {', '.join(MLP_KINDS)}.")
