"""chunk_delta_rule: torch chunked and Triton paths against the sequential float64 oracle (values and every gradient)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.kernels import chunk_delta_rule, triton_available
from zoo.kernels.delta_rule.reference import delta_rule_reference

needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
NAMES = ("q", "k", "v", "beta", "g", "h0")


def make_inputs(B, L, H, K, V, *, dtype=torch.float64, gated=True, n_states=None):
    q = F.normalize(torch.randn(B, L, H, K, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, L, H, K, dtype=torch.float64), dim=-1)
    v = torch.randn(B, L, H, V, dtype=torch.float64)
    beta = torch.rand(B, L, H, dtype=torch.float64).clamp(0.05, 0.95)
    g = F.logsigmoid(torch.randn(B, L, H, dtype=torch.float64) + 2.0) if gated else None
    h0 = torch.randn(n_states or B, H, K, V, dtype=torch.float64) if n_states != 0 else None
    return [x.to(dtype).requires_grad_() if x is not None else None for x in (q, k, v, beta, g, h0)]


def run(fn, xs, **kw):
    q, k, v, beta, g, h0 = xs
    return fn(q, k, v, beta, g, initial_state=h0, output_final_state=True, **kw)


def grads(o, s, xs, do, dh):
    loss = (o.double() * do).sum() + (s.double() * dh).sum()
    live = [x for x in xs if x is not None]
    got = iter(torch.autograd.grad(loss, live))
    return [next(got) if x is not None else None for x in xs]


def assert_close(name, got, want, rtol):
    err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12)).item()
    assert err < rtol, f"{name}: relative error {err:.2e} >= {rtol:.0e}"


def check_against_reference(xs, rtol, **kw):
    o_ref, s_ref = run(delta_rule_reference, xs, cu_seqlens=kw.get("cu_seqlens"))
    o, s = run(chunk_delta_rule, xs, **kw)
    assert not torch.isnan(o).any()
    assert_close("o", o, o_ref, rtol)
    assert_close("final_state", s, s_ref, rtol)
    do, dh = torch.randn_like(o_ref, dtype=torch.float64), torch.randn_like(s_ref, dtype=torch.float64)
    for name, a, b in zip(NAMES, grads(o, s, xs, do, dh), grads(o_ref, s_ref, xs, do, dh)):
        if b is not None:
            assert not torch.isnan(a).any(), f"d{name} has NaN"
            assert_close(f"d{name}", a, b, rtol)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("with_h0", [True, False])
@pytest.mark.parametrize("L,chunk", [(37, 8), (32, 16), (5, 16)])
def test_chunk_equals_recurrent_float64(gated, with_h0, L, chunk):
    xs = make_inputs(2, L, 2, 8, 6, gated=gated, n_states=None if with_h0 else 0)
    check_against_reference(xs, 1e-10, chunk_size=chunk, backend="torch")


def test_chunk_equals_recurrent_float32():
    xs = make_inputs(2, 50, 3, 16, 8, dtype=torch.float32)
    check_against_reference(xs, 1e-4, chunk_size=16, backend="torch")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_packed_equals_separate(backend):
    lens = [7, 0, 21, 4]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    xs = make_inputs(1, sum(lens), 2, 16, 16, n_states=len(lens))
    o, s = run(chunk_delta_rule, xs, cu_seqlens=cu, chunk_size=16, backend=backend)
    for i in range(len(lens)):
        a, b = int(cu[i]), int(cu[i + 1])
        piece = [x[:, a:b] for x in xs[:5]] + [xs[5][i : i + 1]]
        oi, si = run(chunk_delta_rule, piece, chunk_size=16, backend=backend)
        torch.testing.assert_close(o[:, a:b], oi, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s[i : i + 1], si, rtol=1e-10, atol=1e-10)


def test_packed_gradients_match_reference():
    lens = [9, 0, 30, 3]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    xs = make_inputs(1, sum(lens), 2, 8, 4, n_states=len(lens))
    check_against_reference(xs, 1e-10, cu_seqlens=cu, chunk_size=8, backend="torch")


@needs_triton
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("with_h0", [True, False])
def test_triton_matches_reference_float64(gated, with_h0):
    xs = make_inputs(1, 32, 2, 16, 16, gated=gated, n_states=None if with_h0 else 0)
    check_against_reference(xs, 1e-10, chunk_size=16, backend="triton")


@needs_triton
def test_triton_matches_reference_partial_chunk_batched():
    xs = make_inputs(2, 21, 1, 16, 32)
    check_against_reference(xs, 1e-10, chunk_size=16, backend="triton")


@needs_triton
def test_triton_matches_reference_several_value_blocks():
    xs = make_inputs(1, 20, 1, 16, 64)  # V = 64: two value-column programs, partial dq/dk/dbeta/dg summed
    check_against_reference(xs, 1e-10, chunk_size=16, backend="triton")


@needs_triton
def test_triton_matches_reference_packed():
    lens = [5, 0, 27]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    xs = make_inputs(1, sum(lens), 2, 16, 16, n_states=len(lens))
    check_against_reference(xs, 1e-10, cu_seqlens=cu, chunk_size=16, backend="triton")


@needs_triton
def test_triton_matches_reference_float32():
    xs = make_inputs(1, 32, 2, 16, 16, dtype=torch.float32)
    check_against_reference(xs, 1e-4, chunk_size=16, backend="triton")


def test_bf16_long_sequence_is_finite():
    xs = make_inputs(1, 16384, 1, 16, 16, dtype=torch.bfloat16, n_states=0)
    o, s = run(chunk_delta_rule, xs, chunk_size=64, backend="torch")
    o.float().square().mean().backward()
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    for name, x in zip(NAMES, xs):
        if x is not None:
            assert torch.isfinite(x.grad).all(), f"d{name} is not finite"
    # The state of a delta rule with unit keys and beta < 1 stays bounded.
    assert s.abs().max() < 100


def test_bad_inputs_raise_clear_errors():
    q, k, v, beta, g, _ = make_inputs(2, 8, 2, 16, 16)
    with pytest.raises(ValueError, match="log-decay g must be"):
        chunk_delta_rule(q, k, v, beta, g[..., None].expand(2, 8, 2, 16))
    with pytest.raises(ValueError, match="beta must be"):
        chunk_delta_rule(q, k, v, beta[..., 0])
    with pytest.raises(ValueError, match="batch size 1"):
        chunk_delta_rule(q, k, v, beta, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        chunk_delta_rule(q[:1], k[:1], v[:1], beta[:1], cu_seqlens=torch.tensor([0, 5, 3, 8]))
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_delta_rule(q, k, v, beta, initial_state=torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="unknown backend"):
        chunk_delta_rule(q, k, v, beta, backend="jax")


@needs_triton
@pytest.mark.parametrize("K", [8, 24, 48, 96])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_triton_odd_head_dims_match_reference(K, dtype):
    """Head dims that are not powers of two (nor >= 16) are padded to a block and masked, never refused."""
    V = {8: 96, 24: 8, 48: 24, 96: 48}[K]  # every size for V too; 48 and 96 span several value blocks
    xs = make_inputs(1, 19, 1, K, V, dtype=dtype)  # 19: a partial second chunk
    check_against_reference(xs, 1e-10 if dtype == torch.float64 else 1e-4, chunk_size=16, backend="triton")


@needs_triton
def test_triton_largest_head_dims_match_reference():
    xs = make_inputs(1, 17, 1, 256, 40)  # K = 256 (the largest a config allows), V = 40: two value blocks
    check_against_reference(xs, 1e-10, chunk_size=16, backend="triton")


@needs_triton
def test_triton_rejects_chunk_size_that_is_not_a_power_of_two():
    q, k, v, beta, g, _ = make_inputs(1, 8, 1, 12, 16)
    with pytest.raises(ValueError, match="chunk_size to be a power of two"):
        chunk_delta_rule(q, k, v, beta, g, chunk_size=24, backend="triton")


@needs_triton
@pytest.mark.slow
def test_triton_matches_reference_default_chunk_larger_heads():
    lens = [70, 1, 129]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    xs = make_inputs(1, sum(lens), 2, 32, 64, n_states=len(lens))
    check_against_reference(xs, 1e-10, cu_seqlens=cu, chunk_size=64, backend="triton")
