"""Jobs for tests/test_sequence_parallel_core.py (run on every rank by tests/sp_harness.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

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


# --- the public kernels under sequence_parallel(shard): their routing to zoo.parallel.kernels ----------------------


def _routed(fn, inputs: dict, L: int, cu: list[int] | None, out_dim: int, seed: int) -> dict:
    """``fn(**inputs, cu_seqlens=...)`` on the whole sequence vs inside ``sequence_parallel`` on this rank's slice.

    ``inputs`` maps a name to ``(tensor, dim)``: ``dim`` is its sequence dim (sliced), None for a weight shared by
    every rank (its gradient is summed over the group). Returns the slice's output and every input's gradient, each
    with its ``_ref``.
    """
    cu_t = torch.tensor(cu) if cu is not None else None
    ref = {n: t.clone().requires_grad_() for n, (t, _) in inputs.items()}
    out = fn(**ref, cu_seqlens=cu_t)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * w).sum().backward()
    shard = _shard(L, cu)
    loc = {n: (t if d is None else shard.take(t, dim=d)).clone().requires_grad_() for n, (t, d) in inputs.items()}
    with sp.sequence_parallel(shard):
        o = fn(**loc, cu_seqlens=shard.local_cu_seqlens)
    (o * shard.take(w, dim=out_dim)).sum().backward()
    res = {"out": o.detach(), "out_ref": shard.take(out.detach(), dim=out_dim)}
    for n, (_, d) in inputs.items():
        grad = loc[n].grad if loc[n].grad is not None else torch.zeros_like(loc[n])
        if d is None:
            grad = grad.clone()
            dist.all_reduce(grad)
            res[f"grad_{n}"], res[f"grad_{n}_ref"] = grad, ref[n].grad
        else:
            res[f"grad_{n}"], res[f"grad_{n}_ref"] = grad, shard.take(ref[n].grad, dim=d)
    return res


def selective_job(L: int, E: int = 3, N: int = 2, cu: list[int] | None = None, groups: int = 0) -> dict:
    """selective_scan (softplus dt with bias, D, z gate; B/C grouped when ``groups``) split vs whole."""
    from zoo.kernels import selective_scan

    g = torch.Generator().manual_seed(2)
    B = 1 if cu is not None else 2
    bc = (B, groups, N, L) if groups else (B, N, L)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    inputs = {"u": (rnd(B, E, L), 2), "delta": (rnd(B, E, L), 2), "A": (-rnd(E, N).exp(), None),
              "Bm": (rnd(*bc), len(bc) - 1), "Cm": (rnd(*bc), len(bc) - 1), "D": (rnd(E), None),
              "z": (rnd(B, E, L), 2), "bias": (rnd(E), None)}

    def fn(u, delta, A, Bm, Cm, D, z, bias, cu_seqlens):
        return selective_scan(u, delta, A, Bm, Cm, D, z, bias, True, cu_seqlens=cu_seqlens)

    return _routed(fn, inputs, L, cu, out_dim=2, seed=3)


def gla_job(L: int, H: int = 2, K: int = 3, V: int = 2, cu: list[int] | None = None, per_key: bool = False,
            chunk_size: int = 4) -> dict:
    """chunk_gla (scalar or per-key-dim decay) split vs whole."""
    from zoo.kernels import chunk_gla

    g = torch.Generator().manual_seed(4)
    B = 1 if cu is not None else 2
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    inputs = {"q": (rnd(B, L, H, K), 1), "k": (rnd(B, L, H, K), 1), "v": (rnd(B, L, H, V), 1),
              "graw": (rnd(B, L, H, *((K,) if per_key else ())), 1)}

    def fn(q, k, v, graw, cu_seqlens):
        return chunk_gla(q, k, v, F.logsigmoid(graw + 2), cu_seqlens=cu_seqlens, chunk_size=chunk_size)[0]

    return _routed(fn, inputs, L, cu, out_dim=1, seed=5)


def ssd_job(L: int, cu: list[int] | None = None) -> dict:
    """ssd (Mamba-2's scan, a call of chunk_gla): split vs whole, without routing ssd itself."""
    from zoo.kernels import ssd

    g = torch.Generator().manual_seed(6)
    B = 1 if cu is not None else 2
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    inputs = {"x": (rnd(B, L, 4, 2), 1), "dtraw": (rnd(B, L, 4), 1), "A": (-rnd(4).exp(), None),
              "Bm": (rnd(B, L, 2, 3), 1), "Cm": (rnd(B, L, 2, 3), 1), "D": (rnd(4), None)}

    def fn(x, dtraw, A, Bm, Cm, D, cu_seqlens):
        return ssd(x, F.softplus(dtraw), A, Bm, Cm, D, chunk_size=4, cu_seqlens=cu_seqlens)

    return _routed(fn, inputs, L, cu, out_dim=1, seed=7)


def delta_job(L: int, H: int = 2, K: int = 3, V: int = 2, cu: list[int] | None = None, gated: bool = True,
              chunk_size: int = 4) -> dict:
    """chunk_delta_rule (gated or plain) split vs whole: the K x K transitions composed across ranks."""
    from zoo.kernels import chunk_delta_rule

    g = torch.Generator().manual_seed(8)
    B = 1 if cu is not None else 2
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    inputs = {"q": (rnd(B, L, H, K), 1), "k": (rnd(B, L, H, K), 1), "v": (rnd(B, L, H, V), 1),
              "braw": (rnd(B, L, H), 1)}
    if gated:
        inputs["graw"] = (rnd(B, L, H), 1)

    def fn(q, k, v, braw, cu_seqlens, graw=None):
        gate = None if graw is None else F.logsigmoid(graw + 2)
        return chunk_delta_rule(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, torch.sigmoid(braw), gate,
                                cu_seqlens=cu_seqlens, chunk_size=chunk_size)[0]

    return _routed(fn, inputs, L, cu, out_dim=1, seed=9)


def conv_routed_job(L: int, E: int = 3, W: int = 4, cu: list[int] | None = None) -> dict:
    """The public causal_conv1d (with bias) under sequence_parallel: its halo of W-1 inputs."""
    g = torch.Generator().manual_seed(10)
    B = 1 if cu is not None else 2
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    inputs = {"x": (rnd(B, E, L), 2), "w": (rnd(E, W), None), "b": (rnd(E), None)}

    def fn(x, w, b, cu_seqlens):
        return causal_conv1d(x, w, b, "silu", cu_seqlens=cu_seqlens)

    return _routed(fn, inputs, L, cu, out_dim=2, seed=11)
