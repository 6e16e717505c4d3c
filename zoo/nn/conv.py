"""Short causal depthwise convolution (width 4 in Mamba / MoM) with a one-step update."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def check(cond: torch.Tensor, message: str, detail: Callable[[], str] | None = None) -> None:
    """Raise ``ValueError`` unless the 0-d bool tensor ``cond`` is true.

    Eagerly the error is ``message`` followed by ``detail()`` (which may read tensor values). Under
    ``torch.compile`` the check is an in-graph assertion (``torch._assert_async``: a RuntimeError with ``message``)
    instead of a Python branch on tensor data, so it costs no graph break and no specialisation.
    """
    if torch.compiler.is_compiling():
        torch._assert_async(cond, message)
    elif not bool(cond):
        raise ValueError(message + (detail() if detail is not None else ""))


def _check_cu(cu: torch.Tensor, total: int) -> None:
    check(
        (cu[0] == 0) & (cu[-1] == total) & (cu[1:] >= cu[:-1]).all(),
        "cu_seqlens must rise from 0 to the number of packed tokens (non-decreasing); fix the cumulative lengths.",
        lambda: f" Got {cu.tolist()} for {total} tokens.",
    )


def seq_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Index of the packed sequence every token belongs to, ``(total,)`` int64."""
    cu = cu_seqlens.long()
    _check_cu(cu, total)
    n = cu.numel() - 1
    return torch.repeat_interleave(torch.arange(n, device=cu.device), cu[1:] - cu[:-1], output_size=total)


def seq_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every packed token inside its own sequence, ``(total,)``."""
    cu = cu_seqlens.long()
    _check_cu(cu, total)
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=total)
    return torch.arange(total, device=cu.device) - starts


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """``torch.bincount(ids, minlength=n)`` for ids in ``[0, n)``, with a static ``(n,)`` shape (compiles)."""
    return torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(0, ids.long(), torch.ones_like(ids, dtype=torch.long))


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv over time.

    x ``(B, L, E)``, weight ``(E, W)``, state ``(B, E, W-1)`` (previous inputs) or None.
    Returns y ``(B, L, E)`` and the new state (last W-1 inputs, zeros in front when L < W-1).
    With ``cu_seqlens`` (B == 1) taps never reach across a sequence boundary.
    """
    B, L, E = x.shape
    W = weight.shape[-1]
    xt = x.transpose(1, 2)  # (B, E, L)
    prev = state.to(xt.dtype) if state is not None else xt.new_zeros(B, E, W - 1)
    full = torch.cat([prev, xt], dim=-1)  # (B, E, W-1+L)
    if cu_seqlens is None:
        y = F.conv1d(full, weight[:, None, :].to(xt.dtype), bias.to(xt.dtype) if bias is not None else None, groups=E)
    else:
        pos = seq_index(cu_seqlens, L)  # (L,)
        y = xt.new_zeros(B, E, L) if bias is None else bias.to(xt.dtype)[None, :, None].expand(B, E, L).clone()
        for k in range(W):  # tap k looks back k steps; zero it where that crosses the sequence start
            shifted = full[..., W - 1 - k : W - 1 - k + L]
            y = y + weight[:, W - 1 - k, None].to(xt.dtype) * shifted * (pos >= k).to(xt.dtype)
    return y.transpose(1, 2), full[..., full.shape[-1] - (W - 1) :]


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

    def _act(self, y: torch.Tensor) -> torch.Tensor:
        return F.silu(y) if self.activation else y

    def forward(
        self,
        x: torch.Tensor,
        *,
        state: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``(B, L, E)`` -> y ``(B, L, E)``, new state ``(B, E, W-1)``. Padded inputs count as zeros."""
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
            # The carried state must skip padded tokens: keep the last W-1 *real* inputs.
            y, _ = short_conv(x, self.weight, self.bias, state=state, cu_seqlens=cu_seqlens)
            return self._act(y), self._masked_state(x, mask, state)
        y, new_state = short_conv(x, self.weight, self.bias, state=state, cu_seqlens=cu_seqlens)
        return self._act(y), new_state

    def _masked_state(self, x: torch.Tensor, mask: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        B, L, E = x.shape
        W1 = self.kernel_size - 1
        prev = state.to(x.dtype) if state is not None else x.new_zeros(B, E, W1)
        full = torch.cat([prev, x.transpose(1, 2)], dim=-1)  # (B, E, W1+L)
        keep = torch.cat([torch.ones(B, W1, dtype=torch.bool, device=x.device), mask.bool()], dim=1)
        # Stable-sort so real tokens keep their order and come last; take the last W1 of them.
        order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, -W1:] if W1 else keep[:, :0].long()
        return torch.gather(full, 2, order[:, None, :].expand(B, E, W1))

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token ``x (B, E)`` with state ``(B, E, W-1)`` -> ``y (B, E)``, new state."""
        full = torch.cat([state.to(x.dtype), x[..., None]], dim=-1)  # (B, E, W)
        y = (full * self.weight.to(x.dtype)).sum(-1)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return self._act(y), full[..., 1:]
