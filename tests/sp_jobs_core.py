"""Jobs for tests/test_sequence_parallel_core.py (run on every rank by tests/sp_harness.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from zoo.kernels import causal_conv1d, linear_scan
from zoo.parallel import sequence as sp


def _shard(total: int, cu: list[int] | None) -> sp.SequenceShard:
    return sp.SequenceShard(None, dist.get_rank(), dist.get_world_size(), total,
                            torch.tensor(cu) if cu is not None else None)


def scan_job(B: int, L: int, D: int, cu: list[int] | None = None, reverse: bool = False) -> dict:
    """linear_scan split with lasp vs the whole sequence: outputs and gradients of a, b on this rank's slice."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(B, L, D, generator=g, dtype=torch.float64) * 0.5 + 0.5
    b = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    w = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    cu_t = torch.tensor(cu) if cu is not None else None
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    h_ref, _ = linear_scan(ar, br, reverse=reverse, cu_seqlens=cu_t)
    (h_ref * w).sum().backward()
    shard = _shard(L, cu)
    al, bl = shard.take(a).clone().requires_grad_(), shard.take(b).clone().requires_grad_()
    lcu = shard.local_cu_seqlens
    rows = B if lcu is None else lcu.numel() - 1

    def run(h0):
        with sp.local():
            return linear_scan(al, bl, h0, reverse=reverse, cu_seqlens=lcu)

    def transition(cin):
        h0 = torch.zeros(rows, D, dtype=al.dtype)
        if cin is not None:
            h0[cin] = 1
        with sp.local():
            return linear_scan(al, torch.zeros_like(bl), h0, reverse=reverse, cu_seqlens=lcu)[1]

    cin, cout = sp.carry_rows(shard, rows, reverse=reverse)
    h, _ = sp.lasp(run, transition, carry_in=cin, carry_out=cout, shard=shard, reverse=reverse)
    (h * shard.take(w)).sum().backward()
    return {"h": h.detach(), "h_ref": shard.take(h_ref).detach(), "ga": al.grad, "ga_ref": shard.take(ar.grad),
            "gb": bl.grad, "gb_ref": shard.take(br.grad)}


def conv_job(E: int, L: int, W: int, cu: list[int] | None = None) -> dict:
    """causal_conv1d with a halo_before of W-1 inputs vs the whole sequence (batch 1 when packed)."""
    g = torch.Generator().manual_seed(1)
    B = 1 if cu is not None else 2
    x = torch.randn(B, E, L, generator=g, dtype=torch.float64)
    wt = torch.randn(E, W, generator=g, dtype=torch.float64)
    w = torch.randn(B, E, L, generator=g, dtype=torch.float64)
    cu_t = torch.tensor(cu) if cu is not None else None
    xr = x.clone().requires_grad_()
    (causal_conv1d(xr, wt, activation="silu", cu_seqlens=cu_t) * w).sum().backward()
    shard = _shard(L, cu)
    xl = shard.take(x, dim=2).clone().requires_grad_()
    halo = sp.halo_before(xl, W - 1, shard, dim=2)
    lcu = shard.local_cu_seqlens
    if lcu is not None:  # the halo joins the first local document
        lcu = torch.cat([lcu[:1], lcu[1:] + W - 1])
    with sp.local():
        y = causal_conv1d(torch.cat([halo, xl], dim=2), wt, activation="silu", cu_seqlens=lcu)[..., W - 1 :]
    (y * shard.take(w, dim=2)).sum().backward()
    y_ref = causal_conv1d(x, wt, activation="silu", cu_seqlens=cu_t)
    return {"y": y.detach(), "y_ref": shard.take(y_ref, dim=2), "gx": xl.grad, "gx_ref": shard.take(xr.grad, dim=2)}
