"""selective_scan / selective_state_update: every path against the sequential float64 oracle."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from zoo.kernels import selective_scan, selective_state_update
from zoo.kernels.selective.chunked import selective_scan_chunked
from zoo.kernels.selective.reference import selective_scan_ref
from zoo.kernels.selective.triton import selective_scan_triton

F64 = torch.float64


def make_inputs(Bsz=2, E=4, N=3, L=11, G=0, dtype=F64, options=("D", "z", "bias"), h0=False):
    """Random scan inputs; G=0 gives ungrouped (B, N, L) B/C, G>0 grouped (B, G, N, L)."""
    shape_bc = (Bsz, N, L) if G == 0 else (Bsz, G, N, L)
    x = {
        "u": torch.randn(Bsz, E, L, dtype=dtype),
        "delta": torch.randn(Bsz, E, L, dtype=dtype) * 0.5,
        "A": -torch.rand(E, N, dtype=dtype) * 2 - 0.1,
        "B": torch.randn(shape_bc, dtype=dtype),
        "C": torch.randn(shape_bc, dtype=dtype),
        "D": torch.randn(E, dtype=dtype) if "D" in options else None,
        "z": torch.randn(Bsz, E, L, dtype=dtype) if "z" in options else None,
        "delta_bias": torch.randn(E, dtype=dtype) * 0.5 if "bias" in options else None,
        "initial_state": torch.randn(Bsz, E, N, dtype=dtype) if h0 else None,
    }
    return {k: (v.requires_grad_() if v is not None else None) for k, v in x.items()}


def run(fn, inp, softplus=True, last=True, **kw):
    """Outputs and the gradients of a fixed random loss w.r.t. every tensor input."""
    args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    res = fn(*args, softplus, last, initial_state=inp["initial_state"], **kw)
    out, h = res if last else (res, None)
    gen = torch.Generator().manual_seed(123)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=F64).to(out.dtype)).sum()
    if h is not None:
        loss = loss + (h * torch.randn(h.shape, generator=gen, dtype=F64).to(h.dtype)).sum()
    names = [k for k, v in inp.items() if v is not None]
    grads = torch.autograd.grad(loss, [inp[k] for k in names])
    return out, h, dict(zip(names, grads))


def assert_close(a, b, rtol=1e-9, atol=1e-10, what=""):
    assert a.shape == b.shape, what
    err = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item()
    assert err <= atol + rtol * scale, f"{what}: max err {err:.3g} (scale {scale:.3g})"


def assert_same(ref, got, rtol=1e-9, atol=1e-10):
    assert_close(got[0], ref[0], rtol, atol, "out")
    if ref[1] is not None:
        assert_close(got[1], ref[1], rtol, atol, "last state")
    for k in ref[2]:
        assert_close(got[2][k], ref[2][k], rtol, atol, f"d{k}")


CASES = [
    dict(G=0, options=("D", "z", "bias"), softplus=True, h0=True),
    dict(G=2, options=("D", "z", "bias"), softplus=True, h0=False),
    dict(G=0, options=(), softplus=False, h0=False),
    dict(G=1, options=("z",), softplus=True, h0=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"G{c['G']}-{'+'.join(c['options']) or 'plain'}-sp{int(c['softplus'])}-h0{int(c['h0'])}")
@pytest.mark.parametrize("chunk", [4, 64])
def test_chunked_equals_reference(case, chunk):
    inp = make_inputs(L=13, G=case["G"], options=case["options"], h0=case["h0"])
    ref = run(selective_scan_ref, inp, case["softplus"])
    got = run(selective_scan_chunked, inp, case["softplus"], chunk_size=chunk)
    assert_same(ref, got)


@pytest.mark.parametrize("case", CASES[:2], ids=["G0-all-h0", "G2-all"])
def test_triton_equals_reference(case):
    inp = make_inputs(L=10, G=case["G"], options=case["options"], h0=case["h0"])
    ref = run(selective_scan_ref, inp, case["softplus"])
    got = run(selective_scan_triton, inp, case["softplus"], chunk_size=4)
    assert_same(ref, got)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES[2:], ids=["plain", "G1-z-h0"])
def test_triton_equals_reference_more(case):
    inp = make_inputs(E=6, L=19, G=case["G"], options=case["options"], h0=case["h0"])
    ref = run(selective_scan_ref, inp, case["softplus"])
    got = run(selective_scan_triton, inp, case["softplus"], chunk_size=8)
    assert_same(ref, got)


@pytest.mark.parametrize("N", [8, 24, 48, 96])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_triton_any_state_size_equals_reference(N, dtype):
    """State sizes that are not powers of two are masked inside the kernel; values and every gradient."""
    inp = make_inputs(Bsz=1, E=4, N=N, L=6, G=2, h0=True)  # 2 groups, L=6: two chunks of 4, the second partial
    ref = run(selective_scan_ref, inp)
    if dtype != F64:
        inp = {k: (v.detach().to(dtype).requires_grad_() if v is not None else None) for k, v in inp.items()}
    tol = 1e-9 if dtype == F64 else 1e-5
    assert_same(ref, run(selective_scan_triton, inp, chunk_size=4), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float32_close_to_float64_oracle(backend):
    inp = make_inputs(L=9, G=0)
    ref = run(selective_scan_ref, inp)
    inp32 = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in inp.items()}
    got = run(lambda *a, **k: selective_scan(*a, backend=backend, **k), inp32)
    assert_same(ref, got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [selective_scan_chunked, selective_scan_triton], ids=["torch", "triton"])
def test_packed_equals_separate(fn):
    lens = [3, 1, 6]
    inp = make_inputs(Bsz=1, L=sum(lens), options=("D", "z", "bias"))
    cu = torch.tensor([0, 3, 4, 10])
    kw = {"chunk_size": 4}
    ref = run(selective_scan_ref, inp, last=False, cu_seqlens=cu)
    got = run(fn, inp, last=False, cu_seqlens=cu, **kw)
    assert_same(ref, got)
    # the oracle itself: each sequence alone
    args = [inp[k].detach() if inp[k] is not None else None for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        part = [a[..., s:e] if a is not None and a.dim() == 3 else a for a in args]
        alone = selective_scan_ref(*part, True)
        assert_close(got[0][..., s:e], alone, what=f"sequence {s}:{e}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunked_prefill_equals_one_scan(backend):
    inp = make_inputs(L=12, G=0, h0=False)
    args = [inp[k].detach() if inp[k] is not None else None for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    full, h_full = selective_scan(*args, True, True, backend=backend)
    first = [a[..., :5] if a is not None and a.dim() == 3 else a for a in args]
    second = [a[..., 5:] if a is not None and a.dim() == 3 else a for a in args]
    y1, h1 = selective_scan(*first, True, True, backend=backend)
    y2, h2 = selective_scan(*second, True, True, backend=backend, initial_state=h1)
    assert_close(torch.cat([y1, y2], -1), full, what="out")
    assert_close(h2, h_full, what="state")


@pytest.mark.parametrize("G", [0, 2])
def test_state_update_equals_scan(G):
    inp = make_inputs(L=7, G=G, h0=True)
    a = {k: (v.detach() if v is not None else None) for k, v in inp.items()}
    full, h_full = selective_scan_ref(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], True, True,
                                      initial_state=a["initial_state"])
    h = a["initial_state"]
    for t in range(7):
        y, h = selective_state_update(h, a["u"][..., t], a["delta"][..., t], a["A"], a["B"][..., t], a["C"][..., t],
                                      a["D"], a["z"][..., t], a["delta_bias"], dt_softplus=True)
        assert_close(y, full[..., t], what=f"step {t}")
    assert_close(h, h_full, what="state")


def test_chunked_saves_states_only_at_chunk_starts():
    Bsz, E, N, L, chunk = 2, 64, 16, 256, 32
    inp = make_inputs(Bsz=Bsz, E=E, N=N, L=L, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        selective_scan_chunked(*[inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")], True,
                               chunk_size=chunk)
    full_states = Bsz * E * L * N
    assert max(saved) <= Bsz * E * L  # no saved tensor is state-sized: only (B, E, L) inputs and chunk-start states
    assert sum(saved) < full_states  # all saved tensors together are smaller than one (B, E, L, N) tensor


def test_long_sequence_bf16_is_finite():
    torch.manual_seed(0)
    L, E, N = 16384, 8, 16
    u = torch.randn(1, E, L, dtype=torch.bfloat16, requires_grad=True)
    delta = torch.randn(1, E, L, dtype=torch.bfloat16, requires_grad=True)
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)
    B, C = torch.randn(1, N, L, dtype=torch.bfloat16), torch.randn(1, N, L, dtype=torch.bfloat16)
    out, h = selective_scan(u, delta, A, B, C, torch.ones(E), delta_bias=torch.full((E,), -2.0), delta_softplus=True,
                            return_last_state=True, backend="torch")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and torch.isfinite(h).all()
    out.float().square().mean().backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(delta.grad).all()


def test_bad_input_is_rejected():
    a = make_inputs(L=5)
    args = [a[k].detach() if a[k] is not None else None for k in ("u", "delta", "A", "B", "C")]
    with pytest.raises(ValueError, match="delta"):
        selective_scan(args[0], args[1][..., :4], *args[2:])
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(*args[:2], args[2][:3], *args[3:])
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(*args[:3], args[3][..., :4], args[4])
    with pytest.raises(ValueError, match="groups"):
        selective_scan(*args[:3], torch.randn(2, 3, 3, 5, dtype=F64), torch.randn(2, 3, 3, 5, dtype=F64))
    with pytest.raises(ValueError, match="batch size 1"):
        selective_scan(*args, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="unknown backend"):
        selective_scan(*args, backend="cudnn")
    with pytest.raises(ValueError, match="selective_state_update"):
        selective_state_update(torch.zeros(2, 4, 3), torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(4, 3),
                                torch.zeros(2, 3), torch.zeros(2, 3))


@pytest.mark.skipif(
    importlib.util.find_spec("mamba_ssm") is None or not torch.cuda.is_available(),
    reason="needs the optional mamba_ssm package and a CUDA device",
)
def test_cuda_backend_equals_torch():
    inp = make_inputs(L=64, E=16, N=8, dtype=torch.float32)
    a = {k: (v.detach().cuda() if v is not None else None) for k, v in inp.items() if k != "initial_state"}
    args = [a[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    ref, h_ref = selective_scan(*args, True, True, backend="torch")
    got, h = selective_scan(*args, True, True, backend="cuda")
    assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert_close(h, h_ref, rtol=1e-4, atol=1e-4)


# ----- the compiled CPU chunk loop (ZOO_CPU_COMPILE) ------------------------------------------------------------
@pytest.fixture
def compiled_calls(monkeypatch):
    """Force the compiled chunk path and count its calls (fwd / bwd)."""
    from zoo.kernels.selective import chunked

    monkeypatch.setenv("ZOO_CPU_COMPILE", "always")
    calls = []
    real = chunked._run_compiled

    def counting(name, fn, *args):
        calls.append(name)
        return real(name, fn, *args)

    monkeypatch.setattr(chunked, "_run_compiled", counting)
    return calls


def test_compiled_chunks_equal_reference(compiled_calls):
    """The compiled full chunks (the last, shorter chunk eager) against the float64 oracle: values, final state and
    every gradient, with groups, D, z, bias and an initial state; then packed sequences (the keep mask)."""
    from zoo.kernels import _compile

    inp = make_inputs(L=13, G=2, options=("D", "z", "bias"), h0=True)  # chunks 4+4+4 compiled, 1 eager
    assert_same(run(selective_scan_ref, inp), run(selective_scan_chunked, inp, chunk_size=4))
    assert compiled_calls.count("fwd") == 3 and compiled_calls.count("bwd") == 3 and "selective_scan" not in _compile._failed
    lens, cu = [3, 1, 6], torch.tensor([0, 3, 4, 10])
    inp = make_inputs(Bsz=1, L=sum(lens), options=("D", "z", "bias"))
    ref = run(selective_scan_ref, inp, last=False, cu_seqlens=cu)
    assert_same(ref, run(selective_scan_chunked, inp, last=False, cu_seqlens=cu, chunk_size=5))
    assert compiled_calls.count("fwd") == 5 and compiled_calls.count("bwd") == 5


def test_compile_mode_threshold_and_fallback(monkeypatch):
    """auto compiles only in training, at training sizes, on CPU; a compile that fails warns once and the eager loops give
    the same result; a bad ZOO_CPU_COMPILE value is an error that names the choices."""
    from zoo.kernels import _compile
    from zoo.kernels.selective import chunked

    monkeypatch.setattr(_compile, "_compiled", {})
    monkeypatch.setattr(_compile, "_failed", set())
    monkeypatch.setenv("ZOO_CPU_COMPILE", "auto")
    small, big = torch.empty(64, 2, 1, 32), torch.empty(512, 4, 1, 512)
    assert not chunked._use_compiled(small, 16) and chunked._use_compiled(big, 16)
    assert not chunked._use_compiled(big, 16, training=False)  # inference (a one-off prefill) stays eager
    monkeypatch.setenv("ZOO_CPU_COMPILE", "never")
    assert not chunked._use_compiled(big, 16)
    monkeypatch.setenv("ZOO_CPU_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="auto, always or never"):
        chunked._use_compiled(big, 16)

    def broken(fn, **kw):
        def call(*a):
            raise RuntimeError("no C++ compiler")
        return call

    monkeypatch.setenv("ZOO_CPU_COMPILE", "always")
    monkeypatch.setattr(torch, "compile", broken)
    inp = make_inputs(L=9, G=0, h0=True)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        got = run(selective_scan_chunked, inp, chunk_size=4)
    assert "selective_scan" in _compile._failed and not chunked._use_compiled(big, 16)
    assert_same(run(selective_scan_ref, inp), got)


def test_compiled_path_skips_tensor_subclasses(monkeypatch):
    """A tensor subclass (DTensor under tensor parallelism) runs the eager code, without a warning or a compile."""
    from zoo.kernels import _compile

    class Sub(torch.Tensor):
        pass

    monkeypatch.setattr(_compile, "_compiled", {})
    monkeypatch.setattr(_compile, "_failed", set())
    sub = torch.zeros(3).as_subclass(Sub)
    assert _compile.run_compiled("op", "fn", lambda t: t + 1, sub) is None
    assert not _compile._compiled and not _compile._failed
