"""Causal depthwise conv1d as a plain loop over time: the oracle for the fast paths.

``out[b, e, t] = act(bias[e] + sum_k weight[e, k] * x[b, e, t - (W - 1) + k])`` with zeros (or
``initial_states``) before the start and, for packed input, zeros before each sequence's start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    initial_states: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequential causal conv; same arguments as :func:`zoo.kernels.causal_conv1d`."""
    Bsz, E, L = x.shape
    W = weight.shape[1]
    prev = initial_states if initial_states is not None else x.new_zeros(Bsz, E, W - 1)
    full = torch.cat([prev.to(x.dtype), x], dim=-1)  # (B, E, W-1+L)
    start = [0] * L
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        for s, e in zip(cu[:-1], cu[1:]):
            start[s:e] = [s] * (e - s)
    outs = []
    for t in range(L):
        y = x.new_zeros(Bsz, E) if bias is None else bias.to(x.dtype).expand(Bsz, E)
        for k in range(W):
            src = t - (W - 1) + k
            if cu_seqlens is None or src >= start[t]:
                y = y + weight[:, k].to(x.dtype) * full[..., src + W - 1]
        outs.append(y)
    out = torch.stack(outs, dim=-1)
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return (out, full[..., L:]) if return_final_states else out
