"""causal_conv1d / causal_conv1d_update against the sequential float64 oracle."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from zoo.kernels import causal_conv1d, causal_conv1d_update
from zoo.kernels.conv.reference import causal_conv1d_ref

F64 = torch.float64


def grads_of(fn, x, w, b, h0, **kw):
    out = fn(x, w, b, initial_states=h0, **kw)
    gen = torch.Generator().manual_seed(7)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=F64).to(out.dtype)).sum()
    ins = [t for t in (x, w, b, h0) if t is not None]
    return out, torch.autograd.grad(loss, ins)


def assert_close(a, b, tol=1e-10, what=""):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * (1 + b.double().abs().max().item()), f"{what}: max err {err:.3g}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_state", [False, True])
def test_equals_reference_values_and_grads(backend, W, activation, with_state):
    x = torch.randn(2, 5, 9, dtype=F64, requires_grad=True)
    w = torch.randn(5, W, dtype=F64, requires_grad=True)
    b = torch.randn(5, dtype=F64, requires_grad=True) if activation else None  # with and without bias
    h0 = torch.randn(2, 5, W - 1, dtype=F64, requires_grad=True) if with_state else None
    ref, g_ref = grads_of(causal_conv1d_ref, x, w, b, h0, activation=activation)
    got, g_got = grads_of(causal_conv1d, x, w, b, h0, activation=activation, backend=backend)
    assert_close(got, ref, what="out")
    for i, (a, r) in enumerate(zip(g_got, g_ref)):
        assert_close(a, r, what=f"grad {i}")


@pytest.mark.parametrize("E,W", [(8, 2), (24, 3), (48, 4), (96, 3)])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_triton_any_width_and_channels_equal_reference(E, W, dtype):
    """Channel counts that are not multiples of the block and lengths past one time block; every gradient."""
    x = torch.randn(1, E, 70, dtype=F64, requires_grad=True)  # 70: two time blocks of 64, the second masked
    w = torch.randn(E, W, dtype=F64, requires_grad=True)
    b = torch.randn(E, dtype=F64, requires_grad=True)
    h0 = torch.randn(1, E, W - 1, dtype=F64, requires_grad=True)
    ref, g_ref = grads_of(causal_conv1d_ref, x, w, b, h0, activation="silu")
    ins = [t.detach().to(dtype).requires_grad_() for t in (x, w, b, h0)]
    got, g_got = grads_of(causal_conv1d, *ins, activation="silu", backend="triton")
    tol = 1e-10 if dtype == F64 else 1e-5
    assert_close(got, ref, tol=tol, what="out")
    for name, a, r in zip(("dx", "dweight", "dbias", "dinitial_states"), g_got, g_ref):
        assert_close(a, r, tol=tol, what=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float32_close_to_float64_oracle(backend):
    x, w, b = torch.randn(2, 6, 20), torch.randn(6, 4), torch.randn(6)
    ref = causal_conv1d_ref(x.double(), w.double(), b.double(), "silu")
    got = causal_conv1d(x, w, b, "swish", backend=backend)
    assert got.dtype == torch.float32
    assert_close(got, ref, tol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_equals_separate(backend):
    cu = torch.tensor([0, 1, 4, 11])
    x = torch.randn(1, 3, 11, dtype=F64, requires_grad=True)
    w = torch.randn(3, 4, dtype=F64, requires_grad=True)
    b = torch.randn(3, dtype=F64, requires_grad=True)
    ref, g_ref = grads_of(causal_conv1d_ref, x, w, b, None, activation="silu", cu_seqlens=cu)
    got, g_got = grads_of(causal_conv1d, x, w, b, None, activation="silu", cu_seqlens=cu, backend=backend)
    assert_close(got, ref, what="out")
    for i, (a, r) in enumerate(zip(g_got, g_ref)):
        assert_close(a, r, what=f"grad {i}")
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = causal_conv1d(x[..., s:e].detach(), w.detach(), b.detach(), "silu", backend=backend)
        assert_close(got[..., s:e], alone, what=f"sequence {s}:{e}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_update_and_chunks_equal_full_conv(backend):
    x, w, b = torch.randn(2, 5, 10, dtype=F64), torch.randn(5, 3, dtype=F64), torch.randn(5, dtype=F64)
    full = causal_conv1d(x, w, b, "silu", backend=backend)
    # chunked prefill: 1 token (shorter than the state), then 4, then one-step updates
    y1, s = causal_conv1d(x[..., :1], w, b, "silu", return_final_states=True, backend=backend)
    y2, s = causal_conv1d(x[..., 1:5], w, b, "silu", initial_states=s, return_final_states=True, backend=backend)
    ys = [y1, y2]
    for t in range(5, 10):
        y, s_new = causal_conv1d_update(x[..., t], s, w, b, "silu")
        assert s.shape == s_new.shape and not torch.equal(s, s_new)  # functional: the old state is kept
        s = s_new
        ys.append(y[..., None])
    assert_close(torch.cat(ys, -1), full)
    assert_close(s, x[..., -2:])


@pytest.mark.parametrize("W", [1, 5, 7])
def test_torch_any_width_equals_reference(W, monkeypatch):
    """The torch path takes any width (ShortConv of any kernel_size runs on it); the fused kernels take 2 to 4."""
    gen = torch.Generator().manual_seed(W)
    x, w, b = (torch.randn(s, generator=gen, dtype=F64) for s in ((2, 5, 9), (5, W), (5,)))
    h0 = torch.randn(2, 5, W - 1, generator=gen, dtype=F64)
    out, state = causal_conv1d(x, w, b, "silu", initial_states=h0, return_final_states=True)
    assert_close(out, causal_conv1d_ref(x, w, b, "silu", initial_states=h0), what=f"W={W}")
    assert state.shape == (2, 5, W - 1) and torch.equal(state, torch.cat([h0, x], -1)[..., 9:]), "final state"
    step, new = causal_conv1d_update(x[..., 0], h0, w, b, "silu")
    assert_close(step, out[..., 0], what="update")
    assert new.shape == h0.shape and torch.equal(new, torch.cat([h0, x[..., :1]], -1)[..., 1:]), "update state"
    pkg = sys.modules["zoo.kernels.conv"]

    monkeypatch.setattr(pkg, "resolve_backend", lambda backend, *t, **k: backend)  # as if Triton could run here
    with pytest.raises(ValueError, match="backend takes conv widths 2 to 4"):
        causal_conv1d(x, w, backend="triton")


@pytest.mark.parametrize("call, match", [
    (lambda x: causal_conv1d(x, torch.randn(5, 0)), "at least 1"),
    (lambda x: causal_conv1d(x, torch.randn(4, 4)), "weight must be"),
    (lambda x: causal_conv1d(x, torch.randn(5, 4), initial_states=torch.zeros(2, 5, 2)), "initial_states"),
    (lambda x: causal_conv1d_update(x[..., 0], torch.zeros(2, 5, 4), torch.randn(5, 4)), "conv_state"),
    (lambda x: causal_conv1d(x, torch.randn(5, 4), activation="gelu"), "activation"),
    (lambda x: causal_conv1d(x, torch.randn(5, 4), cu_seqlens=torch.tensor([0, 3, 8])), "batch 1"),
])
def test_bad_input_is_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(2, 5, 8))


@pytest.mark.skipif(
    importlib.util.find_spec("causal_conv1d") is None or not torch.cuda.is_available(),
    reason="needs the optional causal_conv1d package and a CUDA device",
)
def test_cuda_backend_equals_torch():
    x, w, b = torch.randn(2, 64, 100, device="cuda"), torch.randn(64, 4, device="cuda"), torch.randn(64, device="cuda")
    assert_close(causal_conv1d(x, w, b, "silu", backend="cuda"), causal_conv1d(x, w, b, "silu", backend="torch"), tol=1e-5)


@pytest.mark.parametrize("W,activation,with_state,tiles", [(4, "silu", True, 3), (3, None, False, 1)])
def test_compiled_cpu_path_equals_reference(W, activation, with_state, tiles, monkeypatch):
    """The torch.compile'd CPU conv (ZOO_CPU_COMPILE=always forces it at this size) against the float64 oracle:
    output and the gradients of x, weight, bias and the initial states; also in tiles of channels (TILE_BYTES
    lowered), as long sequences run it so that no full-size buffer is allocated per call."""
    import zoo.kernels.conv as conv
    from zoo.kernels import _compile

    monkeypatch.setenv("ZOO_CPU_COMPILE", "always")
    if tiles > 1:
        monkeypatch.setattr(conv, "TILE_BYTES", 2 * 2 * (9 + W) * 8)  # two channels of (B 2, L 9 + W) float64
    calls = []
    real = _compile.run_compiled
    monkeypatch.setattr("zoo.kernels.conv.run_compiled", lambda op, name, *a: calls.append(name) or real(op, name, *a))
    x = torch.randn(2, 5, 9, dtype=F64, requires_grad=True)
    w = torch.randn(5, W, dtype=F64, requires_grad=True)
    b = torch.randn(5, dtype=F64, requires_grad=True) if activation else None
    h0 = torch.randn(2, 5, W - 1, dtype=F64, requires_grad=True) if with_state else None
    ref, g_ref = grads_of(causal_conv1d_ref, x, w, b, h0, activation=activation)
    got, g_got = grads_of(causal_conv1d, x, w, b, h0, activation=activation, backend="torch")
    assert sorted(calls) == ["bwd"] * tiles + ["fwd"] * tiles and "causal_conv1d" not in _compile._failed
    assert_close(got, ref, what="out")
    for i, (a, r) in enumerate(zip(g_got, g_ref)):
        assert_close(a, r, what=f"grad {i}")
