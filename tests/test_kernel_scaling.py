"""Every kernel's torch path does work linear in the sequence length, forward and backward (a structural check).

Under plain autograd, indexing chunk n of a saved ``(..., N, ...)`` tensor makes each index's backward zero-fill
the whole tensor, O(N^2) work that a timing test at small sizes would not see. Here a dispatch mode counts the
elements every aten op writes during forward + backward: per token that count must not grow with the number
of chunks (linear code gives the same count per token at 4 and at 32 chunks; the trap gives 8x more).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from zoo.kernels import chunk_delta_rule, chunk_gla, linear_scan, selective_scan, ssd


class _CountWrites(TorchDispatchMode):
    """Sums the numel of every tensor an op returns (in-place ops count the tensor they write)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket not in (torch.ops.aten.view, torch.ops.aten._unsafe_view, torch.ops.aten.as_strided,
                                       torch.ops.aten.select, torch.ops.aten.slice, torch.ops.aten.expand,
                                       torch.ops.aten.t, torch.ops.aten.transpose, torch.ops.aten.permute,
                                       torch.ops.aten.unsqueeze, torch.ops.aten.squeeze, torch.ops.aten.alias,
                                       torch.ops.aten.detach, torch.ops.aten.unbind, torch.ops.aten.split,
                                       torch.ops.aten.split_with_sizes, torch.ops.aten.chunk, torch.ops.aten.diagonal):
            self.elements += sum(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def _elements_per_token(make, L: int) -> float:
    """Elements written per token by one forward + backward of ``make(L)`` -> (loss fn, inputs)."""
    fn, ins = make(L)
    with _CountWrites() as mode:
        loss = fn(*ins)
        torch.autograd.grad(loss, [t for t in ins if isinstance(t, torch.Tensor) and t.requires_grad])
    return mode.elements / L


def _req(*ts):
    return [t.requires_grad_() for t in ts]


def _gla(per_key):
    def make(L):
        H, K, V = 2, 8, 8
        g = F.logsigmoid(torch.randn(1, L, H, *((K,) if per_key else ())))
        ins = _req(torch.randn(1, L, H, K), torch.randn(1, L, H, K), torch.randn(1, L, H, V), g, torch.randn(1, H, K, V))

        def fn(q, k, v, g, h0):
            o, s = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, chunk_size=16, backend="torch")
            return o.sum() + s.sum()
        return fn, ins
    return make


def _ssd(L):
    H, P, N = 2, 4, 8
    ins = _req(torch.randn(1, L, H, P), F.softplus(torch.randn(1, L, H)), -torch.rand(H) - 0.1,
               torch.randn(1, L, 1, N), torch.randn(1, L, 1, N))

    def fn(x, dt, A, B, C):
        y, s = ssd(x, dt, A, B, C, chunk_size=16, return_final_state=True, backend="torch")
        return y.sum() + s.sum()
    return fn, ins


def _delta(L):
    H, K, V = 2, 8, 8
    ins = _req(F.normalize(torch.randn(1, L, H, K), dim=-1), F.normalize(torch.randn(1, L, H, K), dim=-1),
               torch.randn(1, L, H, V), torch.rand(1, L, H) * 0.9, F.logsigmoid(torch.randn(1, L, H) + 2))

    def fn(q, k, v, beta, g):
        o, s = chunk_delta_rule(q, k, v, beta, g, output_final_state=True, chunk_size=16, backend="torch")
        return o.sum() + s.sum()
    return fn, ins


def _selective(L):
    E, N = 4, 4
    ins = _req(torch.randn(1, E, L), torch.randn(1, E, L), -torch.rand(E, N) - 0.1, torch.randn(1, N, L),
               torch.randn(1, N, L), torch.randn(1, E, N))

    def fn(u, delta, A, B, C, h0):
        y, h = selective_scan(u, delta, A, B, C, delta_softplus=True, return_last_state=True, initial_state=h0,
                              backend="torch")
        return y.sum() + h.sum()
    return fn, ins


def _linear(L):
    ins = _req(torch.rand(1, L, 4), torch.randn(1, L, 4))

    def fn(a, b):
        h, last = linear_scan(a, b, backend="torch")
        return h.sum() + last.sum()
    return fn, ins


KERNELS = {"chunk_gla_scalar": _gla(False), "chunk_gla_per_key": _gla(True), "ssd": _ssd,
           "chunk_delta_rule": _delta, "selective_scan": _selective, "linear_scan": _linear}


@pytest.mark.parametrize("name", list(KERNELS))
def test_work_per_token_does_not_grow_with_chunk_count(name):
    make = KERNELS[name]
    short, long = _elements_per_token(make, 4 * 64), _elements_per_token(make, 32 * 64)  # 4 vs 32 chunks of <= 64
    assert long <= 1.25 * short, (
        f"{name}: {long:.0f} elements written per token at 32 chunks vs {short:.0f} at 4: work grows faster than L"
    )
