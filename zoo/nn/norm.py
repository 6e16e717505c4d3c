"""RMSNorm and gated RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels._compile import run_compiled, use_compiled

#: Gated norms over at least this many elements run as one compiled CPU function (``zoo.kernels._compile``).
COMPILE_MIN_ELEMENTS = 1 << 20


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in at least float32 (float64 stays float64), returned in x's dtype.

    ``F.rms_norm``: bit-identical to the hand-written form in float32 / float64, forward and backward, and faster on
    the tiny tensors of a decode step (11 vs 16 us per call on a (1, 1, 256) input on the 2-core CPU).
    """
    dtype = x.dtype
    if dtype in (torch.float32, torch.float64):
        w = weight if weight is None or weight.dtype == dtype else weight.to(dtype)
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    w = None if weight is None else weight.float()
    return F.rms_norm(x.float(), (x.shape[-1],), w, eps).to(dtype)


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim (eps 1e-5 by default)."""

    no_weight_decay = ("weight",)  # no weight decay (zoo.train.optim.no_decay_names)

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """Gated RMSNorm (Mamba-2, MoM, HGRN).

    ``norm_before_gate=False``: ``RMSNorm(y * silu(z))``; ``True``: ``RMSNorm(y) * silu(z)``.
    ``group_size`` normalises groups of that many channels separately (per head), default the whole dim.
    """

    no_weight_decay = ("weight",)  # no weight decay (zoo.train.optim.no_decay_names)

    def __init__(self, dim: int, eps: float = 1e-5, norm_before_gate: bool = False, group_size: int | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.group_size = group_size or dim
        if dim % self.group_size:
            raise ValueError(f"GatedRMSNorm: group_size {self.group_size} must divide dim {dim}.")
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, y: torch.Tensor) -> torch.Tensor:
        if self.group_size == y.shape[-1] and y.dtype == self.weight.dtype:  # one group: one fused call, same result
            return rms_norm(y, self.weight, self.eps)
        shape = y.shape
        y = y.reshape(*shape[:-1], -1, self.group_size)
        y = rms_norm(y, None, self.eps).reshape(shape)
        return y * self.weight.to(y.dtype)

    def forward(self, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if z is None:
            return self._norm(y)
        if y.dtype in (torch.float32, torch.float64) and use_compiled(
                "gated_rms_norm", y, y.numel(), COMPILE_MIN_ELEMENTS,
                torch.is_grad_enabled() and (y.requires_grad or self.weight.requires_grad)):
            # the gate, the norm and their backward fused by inductor (AOTAutograd derives the backward)
            out = run_compiled("gated_rms_norm", "fn", _gated_rms_norm, y, z, self.weight, self.eps, self.group_size,
                               self.norm_before_gate)
            if out is not None:
                return out
        if self.norm_before_gate:
            return self._norm(y) * F.silu(z)
        return self._norm(y * F.silu(z))


def _gated_rms_norm(y, z, weight, eps: float, group_size: int, norm_before_gate: bool):
    """What :class:`GatedRMSNorm` computes, in y's dtype (float32 / float64), as one function for ``torch.compile``."""
    shape = y.shape
    g = F.silu(z.to(y.dtype)).reshape(*shape[:-1], -1, group_size)
    u = y.reshape(*shape[:-1], -1, group_size)
    if not norm_before_gate:
        u = u * g
    out = u * torch.rsqrt(u.square().mean(-1, keepdim=True) + eps) * weight.to(y.dtype).reshape(-1, group_size)
    if norm_before_gate:
        out = out * g
    return out.reshape(shape)
