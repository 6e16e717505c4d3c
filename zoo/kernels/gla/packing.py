"""Packed sequences (``cu_seqlens``) <-> a right-padded batch, for kernels that run packing as a batch.

Right padding with zeros (log-decay 0, key 0) leaves every final state unchanged.
"""

from __future__ import annotations

import torch


def packed_index(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For each packed token: its sequence, its position in that sequence; and the longest length."""
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens)
    pos = torch.arange(int(cu[-1]), device=cu.device) - cu[:-1][seq]
    return seq, pos, int(lens.max()) if lens.numel() else 0


def to_padded_batch(x: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, n: int, lmax: int) -> torch.Tensor:
    """``x (1, T, ...)`` packed -> ``(n, lmax, ...)`` zero-padded on the right; undo with ``y[seq, pos][None]``."""
    return x.new_zeros(n, lmax, *x.shape[2:]).index_put((seq, pos), x[0])
