"""chunk_gla (torch chunked and Triton) and ssd against float64 sequential oracles, values and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.kernels import chunk_gla, ssd, triton_available
from zoo.kernels.gla.reference import gla_recurrent
from zoo.kernels.ssd_scan.reference import ssd_ref

needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
F64 = torch.float64


def make_inputs(B, L, H, K, V, *, per_key, h0, dtype=F64, n_state=None, decay=3.0):
    q, k = torch.randn(B, L, H, K, dtype=dtype), torch.randn(B, L, H, K, dtype=dtype)
    v = torch.randn(B, L, H, V, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, L, H, *((K,) if per_key else ()), dtype=dtype) * 2) * decay
    ins = [q, k, v, g]
    if h0:
        ins.append(torch.randn(n_state or B, H, K, V, dtype=dtype))
    return [t.requires_grad_() for t in ins]


def run(fn, ins, *, cu_seqlens=None, seed=1, **kw):
    """Outputs (o, final state) and the gradients of a random projection of both w.r.t. every input."""
    q, k, v, g, *rest = ins
    o, s = fn(q, k, v, g, initial_state=rest[0] if rest else None, output_final_state=True, cu_seqlens=cu_seqlens, **kw)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=F64).to(o.dtype)).sum()
    loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=F64).to(s.dtype)).sum()
    return [o, s, *torch.autograd.grad(loss, ins)]


NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dh0"]


def assert_close(got, want, rtol, atol, what=""):
    for name, a, b in zip(NAMES, got, want):
        assert torch.isfinite(a).all(), f"{what} {name} has NaN/inf"
        torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{what} {n}: {m}")


@pytest.mark.parametrize("per_key", [False, True], ids=["scalar_g", "per_key_g"])
@pytest.mark.parametrize("h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("chunk", [16, 32])
@pytest.mark.parametrize("decay", [0.1, 3.0], ids=["weak_decay", "strong_decay"])  # both per-key intra paths
def test_torch_chunk_equals_recurrent(per_key, h0, chunk, decay):
    ins = make_inputs(2, 45, 2, 8, 6, per_key=per_key, h0=h0, decay=decay)  # 45: not a multiple of the chunk
    assert_close(run(chunk_gla, ins, chunk_size=chunk, backend="torch"), run(gla_recurrent, ins), 1e-9, 1e-9)


@needs_triton
@pytest.mark.parametrize("per_key", [False, True], ids=["scalar_g", "per_key_g"])
@pytest.mark.parametrize("h0", [False, True], ids=["no_h0", "h0"])
def test_triton_equals_recurrent(per_key, h0):
    ins = make_inputs(1, 40, 2, 16, 16, per_key=per_key, h0=h0)  # 40: not a multiple of the chunk
    assert_close(run(chunk_gla, ins, chunk_size=16, backend="triton"), run(gla_recurrent, ins), 1e-9, 1e-9)


@needs_triton
@pytest.mark.parametrize("per_key", [False, True], ids=["scalar_g", "per_key_g"])
def test_triton_pads_head_dims(per_key):
    ins = make_inputs(2, 20, 1, 5, 12, per_key=per_key, h0=True)  # K, V padded to 16 inside
    assert_close(run(chunk_gla, ins, chunk_size=16, backend="triton"), run(gla_recurrent, ins), 1e-9, 1e-9)


@needs_triton
@pytest.mark.parametrize("K", [8, 24, 48, 96])
@pytest.mark.parametrize("per_key", [False, True], ids=["scalar_g", "per_key_g"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_triton_odd_head_dims_equal_recurrent(K, per_key, dtype):
    """Head dims that are not powers of two: blocks padded and masked in the kernel, values and every gradient."""
    V = {8: 96, 24: 8, 48: 24, 96: 48}[K]  # every size for V too; V = 96 spans two value blocks
    ins = make_inputs(1, 19, 1, K, V, per_key=per_key, h0=True)  # 19: a partial second chunk
    want = run(gla_recurrent, ins)
    if dtype != F64:
        ins = [t.detach().to(dtype).requires_grad_() for t in ins]
    tol = 1e-9 if dtype == F64 else 2e-4
    assert_close(run(chunk_gla, ins, chunk_size=16, backend="triton"), want, tol, tol, f"K={K}")


@needs_triton
@pytest.mark.parametrize("per_key", [False, True], ids=["scalar_g", "per_key_g"])
def test_triton_largest_head_dims_equal_recurrent(per_key):
    ins = make_inputs(1, 17, 1, 256, 20, per_key=per_key, h0=True)  # K = 256 (the largest a config allows)
    assert_close(run(chunk_gla, ins, chunk_size=16, backend="triton"), run(gla_recurrent, ins), 1e-9, 1e-9)


@needs_triton
@pytest.mark.parametrize("per_key", [False, True], ids=["scalar_g", "per_key_g"])
def test_triton_value_blocks_equal_recurrent(per_key, monkeypatch):
    """V split across programs (here 2 blocks of 16): dq and dk are sums of per-block partials."""
    import zoo.kernels.gla.triton as gla_triton

    monkeypatch.setattr(gla_triton, "MAX_BV", 16)
    ins = make_inputs(1, 16, 1, 16, 20, per_key=per_key, h0=True)  # V=20 -> padded 32 -> 2 blocks
    assert_close(run(chunk_gla, ins, chunk_size=16, backend="triton"), run(gla_recurrent, ins), 1e-9, 1e-9)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("per_key", [False, True], ids=["scalar_g", "per_key_g"])
def test_float32_close_to_float64_oracle(backend, per_key):
    ins = make_inputs(1, 40, 2, 16, 16, per_key=per_key, h0=True)
    want = run(gla_recurrent, ins)
    ins32 = [t.detach().float().requires_grad_() for t in ins]
    assert_close(run(chunk_gla, ins32, chunk_size=16, backend=backend), want, 2e-4, 2e-4, backend)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("per_key", [False, True], ids=["scalar_g", "per_key_g"])
def test_packed_equals_separate(backend, per_key):
    cu = torch.tensor([0, 7, 23, 23, 34])  # includes an empty sequence
    ins = make_inputs(1, 34, 1, 16, 16, per_key=per_key, h0=True, n_state=4)
    got = run(chunk_gla, ins, cu_seqlens=cu, chunk_size=16, backend=backend)
    assert_close(got, run(gla_recurrent, ins, cu_seqlens=cu), 1e-9, 1e-9, "vs packed oracle")
    q, k, v, g, h0 = ins
    for i in range(4):
        s, e = int(cu[i]), int(cu[i + 1])
        o_i, s_i = gla_recurrent(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], initial_state=h0[i : i + 1], output_final_state=True)
        torch.testing.assert_close(got[0][:, s:e], o_i)
        torch.testing.assert_close(got[1][i : i + 1], s_i)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_strong_per_key_decay_is_stable(backend):
    """Per-key log-decay of -30 per step: a naive exp(-G) factorisation overflows within one chunk."""
    ins = make_inputs(1, 64, 1, 16, 16, per_key=True, h0=True)
    with torch.no_grad():
        ins[3].copy_(-30 * torch.rand_like(ins[3]))
    ins32 = [t.detach().float().requires_grad_() for t in ins]
    chunk = 64 if backend == "torch" else 32
    assert_close(run(chunk_gla, ins32, chunk_size=chunk, backend=backend), run(gla_recurrent, ins), 1e-4, 1e-4, backend)


def test_long_sequence_bf16_is_finite():
    L = 16384
    q, k = torch.randn(1, L, 2, 16, dtype=torch.bfloat16), torch.randn(1, L, 2, 16, dtype=torch.bfloat16)
    v = torch.randn(1, L, 2, 16, dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(1, L, 2, 16)).to(torch.bfloat16) / 16  # slow decays: the state grows long memories
    ins = [t.requires_grad_() for t in (q, k, v, g)]
    o, s = chunk_gla(*ins, output_final_state=True, backend="torch")
    (o.float().sum() + s.sum()).backward()
    assert o.dtype == torch.bfloat16
    for t in (o, s, *(t.grad for t in ins)):
        assert torch.isfinite(t).all()
    ref, _ = chunk_gla(*(t.detach().float() for t in ins), backend="torch")
    assert (o.float() - ref).norm() / ref.norm() < 2e-2


def test_auto_backend_on_cpu_is_torch():
    ins = [t.detach() for t in make_inputs(1, 10, 1, 4, 4, per_key=False, h0=False, dtype=torch.float32)]
    o_auto, _ = chunk_gla(*ins)
    o_torch, _ = chunk_gla(*ins, backend="torch")
    assert torch.equal(o_auto, o_torch)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "g": a["g"][..., None].expand(2, 10, 2, 3)}, "g \\(log-decay\\) must be"),
        (lambda a: {**a, "g": a["g"][:, :, :1]}, "g \\(log-decay\\) must be"),
        (lambda a: {**a, "v": a["v"][:, :5]}, "v must be"),
        (lambda a: {**a, "initial_state": torch.zeros(2, 2, 4, 4)}, "initial_state must be"),
        (lambda a: {**a, "chunk_size": 0}, "chunk_size must be a positive int"),
        (lambda a: {**a, "cu_seqlens": torch.tensor([0, 4, 10])}, "batch size 1"),
        (lambda a: {**a, "backend": "cuda"}, "no .cuda. backend"),
        (lambda a: {**a, "backend": "jax"}, "unknown backend"),
    ],
)
def test_bad_input_raises_clear_error(change, message):
    args = dict(zip("qkvg", (t.detach() for t in make_inputs(2, 10, 2, 4, 6, per_key=False, h0=False))))
    with pytest.raises((ValueError, RuntimeError), match=message):
        chunk_gla(**change(args))


@needs_triton
def test_triton_rejects_odd_chunk_size():
    args = [t.detach() for t in make_inputs(1, 10, 1, 4, 4, per_key=False, h0=False)]
    with pytest.raises(ValueError, match="power of two"):
        chunk_gla(*args, chunk_size=24, backend="triton")


# ----- ssd -------------------------------------------------------------------------------------------
def ssd_inputs(b=2, l=37, h=4, p=3, g=2, n=5, with_d=True, n_state=None):
    x = torch.randn(b, l, h, p, dtype=F64)
    dt = F.softplus(torch.randn(b, l, h, dtype=F64))
    A = -(torch.rand(h, dtype=F64) * 4 + 0.5)
    B, C = torch.randn(b, l, g, n, dtype=F64), torch.randn(b, l, g, n, dtype=F64)
    D = torch.randn(h, dtype=F64) if with_d else None
    h0 = torch.randn(n_state or b, h, p, n, dtype=F64)
    return [t.requires_grad_() if t is not None else None for t in (x, dt, A, B, C, D, h0)]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("with_d", [True, False])
def test_ssd_equals_sequential(backend, with_d):
    ins = ssd_inputs(with_d=with_d)
    x, dt, A, B, C, D, h0 = ins
    y, hT = ssd(x, dt, A, B, C, D, chunk_size=16, initial_state=h0, return_final_state=True, backend=backend)
    y_ref, h_ref = ssd_ref(x, dt, A, B, C, D, initial_state=h0)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(hT, h_ref)
    leaves = [t for t in ins if t is not None]
    gen = torch.Generator().manual_seed(3)
    wy, wh = torch.randn(y.shape, generator=gen, dtype=F64), torch.randn(hT.shape, generator=gen, dtype=F64)
    got = torch.autograd.grad((y * wy).sum() + (hT * wh).sum(), leaves)
    want = torch.autograd.grad((y_ref * wy).sum() + (h_ref * wh).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_ssd_compiled_intra_chunk_equals_sequential(monkeypatch):
    """The compiled CPU intra-chunk part (ZOO_CPU_COMPILE=always forces it at this size), two groups, float64:
    output, final state and every gradient against the sequential oracle."""
    from zoo.kernels import _compile
    from zoo.kernels.ssd_scan import chunked

    monkeypatch.setenv("ZOO_CPU_COMPILE", "always")
    calls = []
    real = _compile.run_compiled
    monkeypatch.setattr(chunked, "run_compiled", lambda op, name, *a: calls.append(name) or real(op, name, *a))
    ins = ssd_inputs()
    x, dt, A, B, C, D, h0 = ins
    y, hT = ssd(x, dt, A, B, C, D, chunk_size=16, initial_state=h0, return_final_state=True, backend="torch")
    assert calls == ["intra"] and "ssd" not in _compile._failed
    y_ref, h_ref = ssd_ref(x, dt, A, B, C, D, initial_state=h0)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(hT, h_ref)
    leaves = [t for t in ins if t is not None]
    got = torch.autograd.grad(y.square().sum() + hT.sum(), leaves)
    want = torch.autograd.grad(y_ref.square().sum() + h_ref.sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_ssd_torch_path_picks_its_own_chunk_and_stays_exact(monkeypatch):
    from zoo.kernels import ssd_scan

    # Mamba-2's sizes (d_state 128, headdim 64) run at 64 instead of the configured 256; never above chunk_size or L
    assert ssd_scan.torch_chunk(256, 128, 64, 4096) == 64
    assert ssd_scan.torch_chunk(32, 128, 64, 4096) == 32 and ssd_scan.torch_chunk(256, 128, 64, 10) == 10
    assert ssd_scan.torch_chunk(256, 256, 64, 4096) == 128 and ssd_scan.torch_chunk(256, 16, 8, 4096) == 16
    seen = []
    real = ssd_scan.ssd_chunked
    monkeypatch.setattr(ssd_scan, "ssd_chunked", lambda *a, **k: seen.append(k["chunk_size"]) or real(*a, **k))
    ins = ssd_inputs(l=70, p=16, n=32)
    x, dt, A, B, C, D, h0 = ins
    y, hT = ssd(x, dt, A, B, C, D, chunk_size=256, initial_state=h0, return_final_state=True, backend="torch")
    assert seen == [16]  # 0.8 * sqrt(32 * 16) = 18 -> 16
    y_ref, h_ref = ssd_ref(x, dt, A, B, C, D, initial_state=h0)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(hT, h_ref)
    got = torch.autograd.grad(y.sum() + hT.sum(), [x, dt, A, B, C])
    want = torch.autograd.grad(y_ref.sum() + h_ref.sum(), [x, dt, A, B, C])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_ssd_packed_equals_separate():
    cu = torch.tensor([0, 12, 30])
    x, dt, A, B, C, D, h0 = (t.detach() if t is not None else None for t in ssd_inputs(b=1, l=30, n_state=2))
    y, hT = ssd(x, dt, A, B, C, D, chunk_size=16, initial_state=h0, return_final_state=True, cu_seqlens=cu)
    for i in range(2):
        s, e = int(cu[i]), int(cu[i + 1])
        y_i, h_i = ssd_ref(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], D, initial_state=h0[i : i + 1])
        torch.testing.assert_close(y[:, s:e], y_i)
        torch.testing.assert_close(hT[i : i + 1], h_i)


def test_ssd_returns_only_y_by_default():
    x, dt, A, B, C, D, _ = (t.detach() for t in ssd_inputs())
    assert ssd(x, dt, A, B, C, D).shape == x.shape


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "dt": a["dt"][..., :2]}, "dt must be"),
        (lambda a: {**a, "A": a["A"][:2]}, "A must be"),
        (lambda a: {**a, "B": a["B"][:, :, :, :3]}, "B and C must both be"),
        (lambda a: {**a, "B": a["B"].repeat(1, 1, 3, 1)[:, :, :3], "C": a["C"].repeat(1, 1, 3, 1)[:, :, :3]}, "must divide"),
        (lambda a: {**a, "D": a["D"][:1]}, "D must be"),
        (lambda a: {**a, "initial_state": torch.zeros(2, 4, 5, 3)}, "initial_state must be"),
    ],
)
def test_ssd_bad_input_raises_clear_error(change, message):
    x, dt, A, B, C, D, _ = (t.detach() for t in ssd_inputs())
    with pytest.raises(ValueError, match=message):
        ssd(**change(dict(x=x, dt=dt, A=A, B=B, C=C, D=D)))


@needs_triton
def test_triton_bf16_inputs_match_float32():
    ins = [t.detach() for t in make_inputs(1, 32, 1, 16, 16, per_key=False, h0=False, dtype=torch.float32)]
    o_bf, s_bf = chunk_gla(*(t.bfloat16() for t in ins), output_final_state=True, chunk_size=16, backend="triton")
    o_32, s_32 = chunk_gla(*(t.bfloat16().float() for t in ins), output_final_state=True, chunk_size=16, backend="torch")
    assert o_bf.dtype == torch.bfloat16 and s_bf.dtype == torch.float32
    torch.testing.assert_close(o_bf.float(), o_32, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(s_bf, s_32, rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("per_key", [False, True], ids=["scalar_g", "per_key_g"])
def test_triton_larger_shapes_equal_recurrent(per_key):
    ins = make_inputs(2, 100, 2, 32, 48, per_key=per_key, h0=True)  # chunk 32, 4 chunks, V padded to 64
    assert_close(run(chunk_gla, ins, chunk_size=32, backend="triton"), run(gla_recurrent, ins), 1e-9, 1e-9)
