"""linear_scan: every backend against the float64 sequential oracle, values and all gradients."""

from __future__ import annotations

import pytest
import torch

from zoo.kernels import linear_scan
from zoo.kernels.scan.reference import linear_scan_ref

BACKENDS = ["torch", "triton"]
WIDE = {torch.float32: torch.float64, torch.complex64: torch.complex128,
        torch.float64: torch.float64, torch.complex128: torch.complex128}
TOL = {torch.float64: 1e-10, torch.complex128: 1e-10, torch.float32: 2e-5, torch.complex64: 2e-5}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.to(ref.dtype) - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make_inputs(B, L, D, dtype, *, h0=False, n_seq=None, seed=0):
    """Decays with |a| < 1 (some exact zeros), inputs, optional h0, in float64/complex128."""
    gen = torch.Generator().manual_seed(seed)
    wide = WIDE[dtype]
    mag = torch.rand(B, L, D, generator=gen, dtype=torch.float64) * 0.98
    mag[:, L // 3, 0] = 0.0  # an exact reset inside the sequence
    if wide.is_complex:
        a = torch.polar(mag, torch.rand(B, L, D, generator=gen, dtype=torch.float64) * 6.3)
        b = torch.randn(B, L, D, 2, generator=gen, dtype=torch.float64)
        b = torch.view_as_complex(b)
    else:
        a = mag * torch.where(torch.rand(B, L, D, generator=gen) < 0.2, -1.0, 1.0).double()
        b = torch.randn(B, L, D, generator=gen, dtype=torch.float64)
    rows = n_seq if n_seq is not None else B
    s = torch.randn(rows, D, generator=gen, dtype=torch.float64).to(wide) if h0 else None
    return a, b, s


def grads_of(fn, a, b, h0, gh, gl):
    """Outputs of ``fn(a, b, h0)`` and the gradients of <h, gh> + <h_last, gl> w.r.t. a, b (, h0)."""
    ins = [t.detach().clone().requires_grad_() for t in (a, b)] + ([h0.detach().clone().requires_grad_()] if h0 is not None else [])
    h, last = fn(*ins[:2], ins[2] if h0 is not None else None)
    loss = (h * gh.to(h.dtype).conj()).real.sum() + (last * gl.to(last.dtype).conj()).real.sum()
    return (h, last), torch.autograd.grad(loss, ins)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.float32, torch.complex64])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_backend_matches_reference_values_and_grads(backend, dtype, with_h0, reverse, packed):
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32) if packed else None
    B, L, D = (1, 13, 5) if packed else (2, 13, 5)
    a, b, h0 = make_inputs(B, L, D, dtype, h0=with_h0, n_seq=3 if packed else None)
    (h_ref, last_ref) = linear_scan_ref(a, b, h0, reverse=reverse, cu_seqlens=cu)
    gh, gl = torch.randn_like(h_ref), torch.randn_like(last_ref)
    (_, _), g_ref = grads_of(lambda x, y, s: linear_scan_ref(x, y, s, reverse=reverse, cu_seqlens=cu), a, b, h0, gh, gl)

    def run(x, y, s):
        return linear_scan(x.to(dtype), y.to(dtype), s.to(dtype) if s is not None else None,
                           reverse=reverse, cu_seqlens=cu, backend=backend)

    (h, last), g = grads_of(run, a, b, h0, gh, gl)
    assert h.dtype == dtype and last.shape == last_ref.shape
    tol = TOL[dtype]
    assert rel_err(h, h_ref) < tol
    assert rel_err(last, last_ref) < tol
    for name, x, y in zip(["da", "db", "dh0"], g, g_ref):
        assert rel_err(x, y) < tol, name


@pytest.mark.parametrize("D", [8, 24, 48, 96, 200])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_triton_any_width_matches_reference(D, dtype):
    """Channel counts that are not a multiple of the block (200: two blocks of 128, the second masked)."""
    a, b, h0 = make_inputs(2, 9, D, dtype, h0=True)
    h_ref, last_ref = linear_scan_ref(a, b, h0, reverse=True)
    gh, gl = torch.randn_like(h_ref), torch.randn_like(last_ref)
    _, g_ref = grads_of(lambda x, y, s: linear_scan_ref(x, y, s, reverse=True), a, b, h0, gh, gl)
    (h, last), g = grads_of(
        lambda x, y, s: linear_scan(x.to(dtype), y.to(dtype), s.to(dtype), reverse=True, backend="triton"), a, b, h0, gh, gl
    )
    tol = TOL[dtype]
    assert rel_err(h, h_ref) < tol and rel_err(last, last_ref) < tol
    for name, x, y in zip(["da", "db", "dh0"], g, g_ref):
        assert rel_err(x, y) < tol, name


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_torch_path_gradcheck_float64(dtype, reverse, packed):
    cu = torch.tensor([0, 2, 6]) if packed else None
    a, b, h0 = make_inputs(1 if packed else 2, 6, 3, dtype, h0=True, n_seq=2)

    def fn(x, y, s):
        return linear_scan(x, y, s, reverse=reverse, cu_seqlens=cu, backend="torch")

    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (a, b, h0)])


@pytest.mark.parametrize("L", [1, 2, 3, 7, 17, 64, 100, 257])
@pytest.mark.parametrize("reverse", [False, True])
def test_torch_path_any_length_matches_reference(L, reverse):
    a, b, h0 = make_inputs(2, L, 4, torch.float64, h0=True)
    h, last = linear_scan(a, b, h0, reverse=reverse, backend="torch")
    h_ref, last_ref = linear_scan_ref(a, b, h0, reverse=reverse)
    assert rel_err(h, h_ref) < 1e-12 and rel_err(last, last_ref) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_inputs_accumulate_in_float32(backend):
    a, b, h0 = make_inputs(2, 40, 6, torch.float32, h0=True)
    a16, b16 = a.bfloat16(), b.bfloat16()
    gh, gl = torch.randn(2, 40, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    _, g_ref = grads_of(linear_scan_ref, a16.double(), b16.double(), h0, gh, gl)
    (h, last), g = grads_of(lambda x, y, s: linear_scan(x, y, s.float(), backend=backend), a16, b16, h0, gh, gl)
    h_ref, _ = linear_scan_ref(a16.double(), b16.double(), h0)
    assert h.dtype == torch.bfloat16 and last.dtype == torch.bfloat16
    assert rel_err(h.double(), h_ref) < 1e-2
    assert g[0].dtype == torch.bfloat16 and g[2].dtype == torch.float64
    for name, x, y in zip(["da", "db", "dh0"], g, g_ref):
        assert rel_err(x.double(), y) < 2e-2, name


def _long_inputs(L: int, D: int):
    gen = torch.Generator().manual_seed(1)
    a = 1 - torch.rand(1, L, D, generator=gen, dtype=torch.float64) * 0.01  # long memory: decays in [0.99, 1)
    a[:, :, 0] = torch.rand(L, generator=gen, dtype=torch.float64) * 1e-3  # a fast-forgetting channel
    b = torch.randn(1, L, D, generator=gen, dtype=torch.float64)
    return a, b


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_length_16384_torch_path_is_stable(dtype, tol):
    a, b = _long_inputs(16384, 8)
    a_in, b_in = a.to(dtype), b.to(dtype)
    h_ref, _ = linear_scan_ref(a_in.double(), b_in.double())
    h, last = linear_scan(a_in.requires_grad_(), b_in.requires_grad_(), backend="torch")
    assert torch.isfinite(h.float()).all() and torch.isfinite(last.float()).all()
    assert rel_err(h, h_ref) < tol
    h.float().sum().backward()
    assert torch.isfinite(a_in.grad.float()).all() and torch.isfinite(b_in.grad.float()).all()


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_length_16384_triton_is_stable(dtype, tol):
    a, b = _long_inputs(16384, 2)
    a_in, b_in = a.to(dtype), b.to(dtype)
    h_ref, _ = linear_scan_ref(a_in.double(), b_in.double())
    h, _ = linear_scan(a_in, b_in, backend="triton")
    assert torch.isfinite(h.float()).all()
    assert rel_err(h, h_ref) < tol


def test_tiny_and_zero_decays_stay_finite():
    a, b, _ = make_inputs(2, 300, 4, torch.float32)
    a[:, ::7] = 1e-30
    a[:, 3::11] = 0.0
    h, _ = linear_scan(a.float(), b.float(), backend="torch")
    h_ref, _ = linear_scan_ref(a, b)
    assert torch.isfinite(h).all() and rel_err(h, h_ref) < 1e-5


def test_auto_backend_on_cpu_is_torch(monkeypatch):
    import sys

    ls = sys.modules["zoo.kernels.scan"]
    called = []
    monkeypatch.setattr(ls, "linear_scan_chunked", lambda *args, **kw: called.append(1) or linear_scan_ref(*args, **kw))
    a, b, _ = make_inputs(1, 4, 2, torch.float32)
    ls.linear_scan(a, b)
    assert called


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: (torch.rand(2, 5, 3), torch.rand(2, 5, 4), {}), "same shape"),
        (lambda: (torch.rand(2, 5), torch.rand(2, 5), {}), r"\(B, L, D\)"),
        (lambda: (torch.rand(2, 5, 3), torch.rand(2, 5, 3).double(), {}), "cast both"),
        (lambda: (torch.rand(2, 5, 3), torch.rand(2, 5, 3, device="meta"), {}), "one device"),
        (lambda: (torch.rand(2, 5, 3).int(), torch.rand(2, 5, 3).int(), {}), "not supported"),
        (lambda: (torch.rand(2, 0, 3), torch.rand(2, 0, 3), {}), "empty"),
        (lambda: (torch.rand(2, 5, 3), torch.rand(2, 5, 3), {"h0": torch.rand(3, 3)}), r"h0 must be \(B, D\)"),
        (lambda: (torch.rand(2, 5, 3), torch.rand(2, 5, 3), {"h0": torch.rand(2, 3, dtype=torch.complex64)}), "h0 is complex"),
        (lambda: (torch.rand(2, 5, 3), torch.rand(2, 5, 3), {"cu_seqlens": torch.tensor([0, 5])}), "batch size 1"),
        (lambda: (torch.rand(1, 5, 3), torch.rand(1, 5, 3), {"cu_seqlens": torch.tensor([0, 4])}), r"from 0 to the number of packed tokens \(5\)"),
        (lambda: (torch.rand(1, 5, 3), torch.rand(1, 5, 3), {"cu_seqlens": torch.tensor([0, 3, 2, 5])}), "without decreasing"),
        (lambda: (torch.rand(1, 5, 3), torch.rand(1, 5, 3), {"cu_seqlens": torch.tensor([0, 2, 5]), "h0": torch.rand(1, 3)}),
         r"\(N, D\)"),
        (lambda: (torch.rand(2, 5, 3), torch.rand(2, 5, 3), {"backend": "jax"}), "unknown backend"),
        (lambda: (torch.rand(2, 5, 3), torch.rand(2, 5, 3), {"backend": "cuda"}), "no 'cuda' backend"),
    ],
)
def test_bad_input_raises_one_clear_error(build, match):
    a, b, kw = build()
    with pytest.raises((ValueError, RuntimeError), match=match):
        linear_scan(a, b, **kw)


def test_triton_on_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        linear_scan(torch.rand(1, 3, 2), torch.rand(1, 3, 2), backend="triton")
