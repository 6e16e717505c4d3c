"""Kernels whose torch path builds tensors larger than their inputs (fft_conv's FFT buffers, the (chunks, heads, c, c)
intra-chunk matrices of ssd and chunk_delta_rule) work in tiles of at most ``TILE_BYTES``.

Why: a fresh buffer past glibc's mmap threshold (32 MiB at most) is mapped and unmapped on every call, so each call
page-faults all of it again; that system time grows the per-token cost with L (zoo bench scaling). The structural
check counts the bytes of every tensor an op returns during forward + backward: none may exceed the larger of the
tile budget and the largest input / output / gradient. The exactness checks force many tiles against the float64
oracles, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import zoo.kernels.delta_rule.chunked as delta_chunked
import zoo.kernels.gla.chunked as gla_chunked
import zoo.kernels.long_conv as long_conv
import zoo.kernels.ssd_scan.chunked as ssd_chunked
from zoo.kernels import chunk_delta_rule, chunk_gla, fft_conv, ssd
from zoo.kernels._dispatch import TILE_BYTES as BUDGET  # the tile budget the kernels ship with
from zoo.kernels.delta_rule.reference import delta_rule_reference
from zoo.kernels.gla.reference import gla_recurrent
from zoo.kernels.long_conv.reference import fft_conv_ref
from zoo.kernels.ssd_scan.reference import ssd_ref


class _LargestBuffer(TorchDispatchMode):
    """The largest storage (bytes) of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _fft_case(L=16384):
    ins = [torch.randn(1, 64, L), torch.randn(64, L) / L, torch.randn(64)]
    return (lambda u, k, D: fft_conv(u, k, D)), ins


def _ssd_case(L=8192):
    h, p, n = 8, 8, 8
    ins = [torch.randn(1, L, h, p), F.softplus(torch.randn(1, L, h)), -torch.rand(h) - 0.1,
           torch.randn(1, L, 1, n), torch.randn(1, L, 1, n)]
    return (lambda x, dt, A, B, C: ssd(x, dt, A, B, C, chunk_size=256, backend="torch")), ins


def _delta_case(L=4096):
    H, K = 16, 8
    ins = [F.normalize(torch.randn(1, L, H, K), dim=-1), F.normalize(torch.randn(1, L, H, K), dim=-1),
           torch.randn(1, L, H, K), torch.rand(1, L, H) * 0.9, F.logsigmoid(torch.randn(1, L, H) + 2)]
    return (lambda q, k, v, beta, g: chunk_delta_rule(q, k, v, beta, g, chunk_size=64, backend="torch")[0]), ins


def _gla_case(per_key: bool, L=4096):
    H, K = (4, 16) if per_key else (16, 8)
    g = F.logsigmoid(torch.randn(1, L, H, *((K,) if per_key else ())) - 1)  # strong decays: per-key sub-chunk path
    ins = [torch.randn(1, L, H, K), torch.randn(1, L, H, K), torch.randn(1, L, H, K), g]
    return (lambda q, k, v, g: chunk_gla(q, k, v, g, chunk_size=64, backend="torch")[0]), ins


@pytest.mark.parametrize("make", [_fft_case, _ssd_case, _delta_case, lambda: _gla_case(False), lambda: _gla_case(True)],
                         ids=["fft_conv", "ssd", "chunk_delta_rule", "chunk_gla_scalar", "chunk_gla_per_key"])
def test_no_buffer_outgrows_the_tile_budget_or_the_inputs(make):
    torch.manual_seed(0)
    fn, ins = make()
    ins = [t.requires_grad_() for t in ins]
    with _LargestBuffer() as mode:
        out = fn(*ins)
        grads = torch.autograd.grad(out.sum(), ins)
    io = max(t.untyped_storage().nbytes() for t in [*ins, out, *grads])
    assert io < BUDGET, "the case must be sized so that only intermediates can pass the budget"
    assert mode.largest <= BUDGET, (
        f"a {mode.largest / 2**20:.1f} MiB intermediate (inputs/outputs at most {io / 2**20:.1f} MiB): "
        f"not tiled under {BUDGET >> 20} MiB"
    )


def _grads(out, ins, seed):
    return torch.autograd.grad((out * seed).sum(), ins)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("kshape", ["causal", "two_sided", "channels"])
def test_fft_conv_in_many_tiles_matches_direct_convolution(monkeypatch, kshape):
    monkeypatch.setattr(long_conv, "TILE_BYTES", 1)  # one channel per tile
    torch.manual_seed(0)
    B, H, L = 2, 5, 13
    Lk = 2 * L if kshape == "two_sided" else L
    u = torch.randn(B, H, L, dtype=torch.float64, requires_grad=True)
    k = torch.randn(*((3,) if kshape == "channels" else ()), H, Lk, dtype=torch.float64, requires_grad=True)
    D = torch.randn(k.shape[:-1], dtype=torch.float64, requires_grad=True)
    y, ref = fft_conv(u, k, D), fft_conv_ref(u, k, D)
    assert _rel(y, ref) < 1e-10
    seed = torch.randn_like(ref)
    for g, g_ref in zip(_grads(y, [u, k, D], seed), _grads(ref, [u, k, D], seed)):
        assert _rel(g, g_ref) < 1e-10


@pytest.mark.parametrize("groups", [1, 2])
def test_ssd_in_many_tiles_matches_the_sequential_reference(monkeypatch, groups):
    monkeypatch.setattr(ssd_chunked, "TILE_BYTES", 1)  # one chunk per tile
    torch.manual_seed(0)
    b, l, h, p, n = 2, 37, 4, 3, 5
    f64 = dict(dtype=torch.float64)
    ins = [torch.randn(b, l, h, p, **f64), F.softplus(torch.randn(b, l, h, **f64)), -torch.rand(h, **f64) - 0.1,
           torch.randn(b, l, groups, n, **f64), torch.randn(b, l, groups, n, **f64), torch.randn(b, h, p, n, **f64)]
    ins = [t.requires_grad_() for t in ins]
    x, dt, A, B, C, h0 = ins
    y, s = ssd(x, dt, A, B, C, chunk_size=8, initial_state=h0, return_final_state=True, backend="torch")
    y_ref, s_ref = ssd_ref(x, dt, A, B, C, initial_state=h0)
    assert _rel(y, y_ref) < 1e-10 and _rel(s, s_ref) < 1e-10
    seed = torch.randn_like(y_ref)
    for g, g_ref in zip(_grads(y, ins, seed), _grads(y_ref, ins, seed)):
        assert _rel(g, g_ref) < 1e-10


@pytest.mark.parametrize("packed", [False, True])
def test_chunk_delta_rule_in_many_tiles_matches_the_recurrence(monkeypatch, packed):
    monkeypatch.setattr(delta_chunked, "TILE_BYTES", 1)  # one chunk per tile
    torch.manual_seed(0)
    B, L, H, K, V = (1, 41, 2, 4, 3) if packed else (2, 29, 2, 4, 3)
    f64 = dict(dtype=torch.float64)
    ins = [F.normalize(torch.randn(B, L, H, K, **f64), dim=-1), F.normalize(torch.randn(B, L, H, K, **f64), dim=-1),
           torch.randn(B, L, H, V, **f64), torch.rand(B, L, H, **f64), F.logsigmoid(torch.randn(B, L, H, **f64) + 2)]
    ins = [t.requires_grad_() for t in ins]
    cu = torch.tensor([0, 9, 30, 41]) if packed else None
    N = 3 if packed else B
    h0 = torch.randn(N, H, K, V, **f64, requires_grad=True)
    kw = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o, s = chunk_delta_rule(*ins, chunk_size=8, backend="torch", **kw)
    o_ref, s_ref = delta_rule_reference(*ins, **kw)
    assert _rel(o, o_ref) < 1e-10 and _rel(s, s_ref) < 1e-10
    seed, seed_s = torch.randn_like(o_ref), torch.randn_like(s_ref)
    grads = torch.autograd.grad((o * seed).sum() + (s * seed_s).sum(), [*ins, h0])
    for g, g_ref in zip(grads, torch.autograd.grad((o_ref * seed).sum() + (s_ref * seed_s).sum(), [*ins, h0])):
        assert _rel(g, g_ref) < 1e-10


@pytest.mark.parametrize("gate", ["scalar", "per_key_factored", "per_key_sub_chunks"])
def test_chunk_gla_in_many_tiles_matches_the_recurrence(monkeypatch, gate):
    monkeypatch.setattr(gla_chunked, "TILE_BYTES", 1)  # one chunk per tile
    torch.manual_seed(0)
    B, L, H, K, V = 2, 45, 2, 4, 3
    f64 = dict(dtype=torch.float64)
    shift = -4.0 if gate == "per_key_sub_chunks" else 2.0  # strong decays: spans past SAFE_SPAN in a 32-step chunk
    g = F.logsigmoid(torch.randn(B, L, H, *(() if gate == "scalar" else (K,)), **f64) + shift)
    ins = [torch.randn(B, L, H, K, **f64), torch.randn(B, L, H, K, **f64), torch.randn(B, L, H, V, **f64), g,
           torch.randn(B, H, K, V, **f64)]
    ins = [t.requires_grad_() for t in ins]
    q, k, v, g, h0 = ins
    kw = dict(initial_state=h0, output_final_state=True)
    o, s = chunk_gla(q, k, v, g, chunk_size=32, backend="torch", **kw)
    o_ref, s_ref = gla_recurrent(q, k, v, g, **kw)
    assert _rel(o, o_ref) < 1e-10 and _rel(s, s_ref) < 1e-10
    seed, seed_s = torch.randn_like(o_ref), torch.randn_like(s_ref)
    grads = torch.autograd.grad((o * seed).sum() + (s * seed_s).sum(), ins)
    for gr, g_ref in zip(grads, torch.autograd.grad((o_ref * seed).sum() + (s_ref * seed_s).sum(), ins)):
        assert _rel(gr, g_ref) < 1e-10


def test_causal_conv1d_keeps_only_its_output_and_input_gradient_full_size(monkeypatch):
    import zoo.kernels.conv as conv
    from zoo.kernels import causal_conv1d

    monkeypatch.setattr(conv, "TILE_BYTES", 1 << 20, raising=False)  # 1 MiB tiles of a 4 MiB input
    torch.manual_seed(0)
    x, w, b = torch.randn(1, 64, 16384, requires_grad=True), torch.randn(64, 4, requires_grad=True), torch.randn(64)

    class _Big(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
            self.n += sum(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen
                          and t.untyped_storage().nbytes() > 1 << 20 for t in tree_leaves(out))  # fresh buffers only
            return out

    with _Big() as big:
        out = causal_conv1d(x, w, b, "silu", backend="torch")
        torch.autograd.grad(out.sum(), [x, w])
    # the output and x's gradient; untiled, the padded input, the pre-activation and their gradients were full size too
    assert big.n == 2, big.n


@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_causal_conv1d_in_many_tiles_matches_the_reference(monkeypatch, state, packed):
    import zoo.kernels.conv as conv
    from zoo.kernels import causal_conv1d
    from zoo.kernels.conv.reference import causal_conv1d_ref

    monkeypatch.setattr(conv, "TILE_BYTES", 1)  # one channel per tile
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    B, E, L, W = (1, 5, 23, 4) if packed else (2, 5, 17, 3)
    x, w, b = torch.randn(B, E, L, **f64), torch.randn(E, W, **f64), torch.randn(E, **f64)
    h0 = torch.randn(B, E, W - 1, **f64) if state and not packed else None
    cu = torch.tensor([0, 7, 23]) if packed else None
    ins = [t.requires_grad_() for t in (x, w, b) + ((h0,) if h0 is not None else ())]
    kw = dict(initial_states=h0, cu_seqlens=cu)
    y, ref = causal_conv1d(x, w, b, "silu", backend="torch", **kw), causal_conv1d_ref(x, w, b, "silu", **kw)
    assert _rel(y, ref) < 1e-12
    seed = torch.randn_like(ref)
    for g, g_ref in zip(_grads(y, ins, seed), _grads(ref, ins, seed)):
        assert _rel(g, g_ref) < 1e-12
