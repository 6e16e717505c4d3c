"""S4's Vandermonde and Cauchy products work in blocks / tiles with no ``(H, N, L)`` tensor (zoo bench scaling).

Exactness: the blocked Vandermonde products (and DPLR's blocked dense power sum) equal the direct formulas in float64 (values and gradients; lengths
that are not a multiple of the block, offsets, batch rows, one channel per tile), and the tiled mixer (one node
per Cauchy tile, one channel per Vandermonde tile) equals the token-by-token recurrence with a carried state.
Structure: no op output during forward + backward of the kernel, or of a scan with a state carried in and out,
exceeds the larger of the tile budget and the largest input / output / gradient (the pattern of
tests/test_kernel_tiles.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_kernel_tiles import _LargestBuffer

import zoo.mixers.s4 as s4_mod
from zoo.kernels._dispatch import TILE_BYTES as BUDGET
from zoo.mixers.s4 import S4

F64 = torch.float64


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _modes(Hc, N2):
    """Leaf real tensors for dtA = -exp(ar) + i ai (Re < 0, fast and slow modes) in float64."""
    ar = (torch.linspace(-5, 0.5, Hc * N2, dtype=F64).reshape(Hc, N2) + 0.1 * torch.randn(Hc, N2, dtype=F64))
    ai = torch.randn(Hc, N2, dtype=F64) * 3
    return ar.requires_grad_(), ai.requires_grad_()


def _direct(coef, dtA, L, offset):
    """The old formula: the full (..., Hc, N2, L) table of powers."""
    pos = torch.arange(offset, offset + L, dtype=F64)
    return (coef[..., None] * torch.exp(dtA[..., None] * pos)).sum(-2).real


@pytest.mark.parametrize("tiles", ["default", "one_channel"])
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("L,offset", [(1, 0), (7, 1), (50, 0), (50, 3), (64, 1)])
def test_blocked_vandermonde_equals_the_direct_formula(monkeypatch, tiles, batch, L, offset):
    if tiles == "one_channel":
        monkeypatch.setattr(s4_mod, "TILE_BYTES", 1)
    torch.manual_seed(0)
    Hc, N2 = 3, 4
    if L == 50:
        assert L % s4_mod._block_len(L), "50: 7 blocks of 8, the last one partly past L"
    ar, ai = _modes(Hc, N2)
    cr, ci = (torch.randn(*batch, Hc, N2, dtype=F64, requires_grad=True) for _ in range(2))
    ins = [ar, ai, cr, ci]

    def run(fn):
        dtA, coef = torch.complex(-ar.exp(), ai), torch.complex(cr, ci)
        return fn(coef, dtA, L, offset)

    y, ref = run(S4._vandermonde), run(_direct)
    assert y.shape == ref.shape == (*batch, Hc, L)
    assert _rel(y, ref) < 1e-12
    seed = torch.randn_like(ref)
    for g, g_ref in zip(torch.autograd.grad((y * seed).sum(), ins), torch.autograd.grad((ref * seed).sum(), ins)):
        assert _rel(g, g_ref) < 1e-11


@pytest.mark.parametrize("tiles", ["default", "one_channel"])
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("L", [1, 7, 50, 64])
def test_blocked_transposed_vandermonde_equals_the_direct_formula(monkeypatch, tiles, batch, L):
    if tiles == "one_channel":
        monkeypatch.setattr(s4_mod, "TILE_BYTES", 1)
    torch.manual_seed(1)
    Hc, N2 = 3, 4
    ar, ai = _modes(Hc, N2)
    u = torch.randn(*batch, Hc, L, dtype=F64, requires_grad=True)
    ins = [ar, ai, u]
    dtA = lambda: torch.complex(-ar.exp(), ai)  # noqa: E731
    y = S4._vandermonde_t(u, dtA())
    ref = (u[..., None, :].to(torch.complex128) * torch.exp(dtA()[..., None] * torch.arange(L, dtype=F64))).sum(-1)
    assert y.shape == ref.shape == (*batch, Hc, N2)
    assert _rel(y, ref) < 1e-12
    seed = torch.randn_like(ref)
    loss = lambda t: (torch.view_as_real(t) * torch.view_as_real(seed)).sum()  # noqa: E731
    for g, g_ref in zip(torch.autograd.grad(loss(y), ins), torch.autograd.grad(loss(ref), ins)):
        assert _rel(g, g_ref) < 1e-11


@pytest.mark.parametrize("tiles", ["default", "one_channel"])
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("L", [1, 7, 23, 64])
def test_blocked_dense_power_sum_equals_the_direct_sum(monkeypatch, tiles, batch, L):
    """DPLR final state: sum_l dA^l v u_l (23: 3 blocks of 8, an odd count, the last one partly past L)."""
    if tiles == "one_channel":
        monkeypatch.setattr(s4_mod, "TILE_BYTES", 1)
    torch.manual_seed(2)
    Hc, N = 3, 4
    C128 = torch.complex128
    dA = (0.3 * torch.randn(Hc, N, N, dtype=C128) + 0.5 * torch.eye(N, dtype=C128)).requires_grad_()
    v = torch.randn(Hc, N, dtype=C128, requires_grad=True)
    u = torch.randn(*batch, Hc, L, dtype=F64, requires_grad=True)
    ins = [dA, v, u]
    y = S4._power_sum(dA, v, u)
    x, terms = v, []
    for _ in range(L):
        terms.append(x)
        x = (dA @ x[..., None])[..., 0]
    ref = (torch.stack(terms, -1) * u[..., None, :]).sum(-1)  # (..., Hc, N)
    assert y.shape == ref.shape == (*batch, Hc, N)
    assert _rel(y, ref) < 1e-12
    seed = torch.randn_like(ref)
    loss = lambda t: (torch.view_as_real(t) * torch.view_as_real(seed)).sum()  # noqa: E731
    g_all = torch.autograd.grad(loss(y), ins, allow_unused=True)  # L=1: dA^0 does not depend on dA
    for g, g_ref in zip(g_all, torch.autograd.grad(loss(ref), ins, allow_unused=True)):
        assert (g is None and g_ref is None) or _rel(g, g_ref) < 1e-11


@pytest.mark.parametrize("mode", ["s4d", "dplr"])
def test_mixer_in_many_tiles_equals_the_recurrence(monkeypatch, mode):
    """One channel per Vandermonde tile, one node per Cauchy tile: scan with a carried state == step loop."""
    monkeypatch.setattr(s4_mod, "TILE_BYTES", 1)
    torch.manual_seed(0)
    m = S4(3, d_state=8, mode=mode).double()
    with torch.no_grad():
        m.log_dt.copy_(torch.linspace(math.log(1e-2), math.log(0.5), 3, dtype=F64))
    B, L = 2, 23  # 23: blocks of 5, the last one partly past L
    x = torch.randn(B, L, 3, dtype=F64, requires_grad=True)
    x0 = torch.randn(B, 3, 4, dtype=torch.complex128)
    y, st = m.scan(x, state={"x": x0}, return_state=True)
    state, ys = {"x": x0}, []
    for t in range(L):
        yt, state = m.step(x[:, t], state)
        ys.append(yt)
    y_rec = torch.stack(ys, dim=1)
    assert _rel(y, y_rec) < 1e-10 and _rel(st["x"], state["x"]) < 1e-10
    ins = [x, *m.parameters()]
    seed, seed_s = torch.randn_like(y), torch.randn_like(torch.view_as_real(st["x"]))

    def loss(y, s):
        return (y * seed).sum() + (torch.view_as_real(s) * seed_s).sum()

    for g, g_ref in zip(torch.autograd.grad(loss(y, st["x"]), ins), torch.autograd.grad(loss(y_rec, state["x"]), ins)):
        assert _rel(g, g_ref) < 1e-9


def _kernel_case(m, L):
    return (lambda: m.kernel(L)), []


def _scan_case(m, L):
    x = torch.randn(1, L, m.d_model, requires_grad=True)
    x0 = torch.randn(1, m.d_model, m.d_state // 2, dtype=torch.complex64)

    def fn():
        y, st = m.scan(x, state={"x": x0}, return_state=True)
        return y.sum(-1) + torch.view_as_real(st["x"]).sum()  # (1, L): output and final state both in the graph
    return fn, [x]


@pytest.mark.parametrize("mode", ["s4d", "dplr"])
@pytest.mark.parametrize("case", [_kernel_case, _scan_case], ids=["kernel", "scan_with_state"])
def test_no_buffer_outgrows_the_tile_budget_or_the_inputs(mode, case):
    torch.manual_seed(0)
    m = S4(64, d_state=64, mode=mode)  # the old code built (64, 32, 8192) float32 tables: 64 MiB each
    fn, xs = case(m, 8192)
    params = list(m.parameters())
    with _LargestBuffer() as probe:
        out = fn()
        grads = torch.autograd.grad(out.sum(), [*xs, *params], allow_unused=True)
    io = max(t.untyped_storage().nbytes() for t in [*xs, *params, out, *(g for g in grads if g is not None)])
    assert io < BUDGET, "the case must be sized so that only intermediates can pass the budget"
    assert probe.largest <= BUDGET, (
        f"a {probe.largest / 2**20:.1f} MiB intermediate (inputs/outputs at most {io / 2**20:.1f} MiB): "
        f"not tiled under {BUDGET >> 20} MiB"
    )
