"""Triton portability: every kernel compiles once per configuration, whatever the sequence length.

A Triton kernel is compiled once per specialisation key: the values of its ``tl.constexpr`` arguments plus,
for the other integer arguments, whether they equal 1 or are divisible by 16 (unless listed in
``do_not_specialize``), plus dtypes and pointer alignment. The interpreter keeps no compile cache, so the
launches are wrapped and the key is computed with Triton's own binder (``create_function_from_signature``,
the function ``JITFunction.run`` uses). The set of keys of the fwd and bwd launches must not grow when the
same call runs at other lengths: a chunk count or a length passed as ``tl.constexpr`` (or specialised) fails.

The interpreter does not check what only the compiler checks (loop-carried types, dot shapes, mask types in
``scf.while`` bodies), so a slow test also compiles every kernel, as its host code launches it for fp32 and
bf16 inputs, down to a CUDA binary for sm_90 in a process without the interpreter; no GPU is needed for that
(``python tests/test_triton_compat.py`` runs the same check).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import BaseBackend  # noqa: E402
from triton.runtime.jit import KernelParam, create_function_from_signature  # noqa: E402

from zoo.kernels import causal_conv1d, chunk_delta_rule, chunk_gla, linear_scan, selective_scan  # noqa: E402


def _binder(kernel):
    """Triton's argument binder for ``kernel`` (a JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1)."""
    sig = inspect.signature(kernel.fn)
    if hasattr(kernel, "params"):  # compiled mode: the JITFunction's own parameters
        params = kernel.params
    else:
        opts = getattr(kernel, "kwargs", {})
        dns, dnsoa = opts.get("do_not_specialize") or (), opts.get("do_not_specialize_on_alignment") or ()
        params = [KernelParam(i, p, i in dns or p.name in dns, i in dnsoa or p.name in dnsoa)
                  for i, p in enumerate(sig.parameters.values())]
    return create_function_from_signature(sig, params, BaseBackend)


@pytest.fixture
def compile_keys(monkeypatch):
    """Install a recorder on kernels: ``record(*kernels)``; the returned dict maps kernel name -> set of keys."""
    keys: dict[str, set] = defaultdict(set)

    def record(*kernels):
        for kernel in kernels:
            binder, run = _binder(kernel), kernel.run

            def wrapped(*args, grid, warmup, _k=kernel, _b=binder, _run=run, **kwargs):
                _, spec, options = _b(*args, **kwargs)
                keys[_k.fn.__name__].add((str(spec), str(sorted(options.items()))))
                return _run(*args, grid=grid, warmup=warmup, **kwargs)

            monkeypatch.setattr(kernel, "run", wrapped)
        return keys

    return record


def _fwd_bwd(outputs):
    outs = [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])


def _linear_scan(L):
    a = torch.rand(2, L, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, L, 5, dtype=torch.float64, requires_grad=True)
    _fwd_bwd(linear_scan(a, b, torch.randn(2, 5, dtype=torch.float64, requires_grad=True), backend="triton"))


def _selective_scan(L):
    E, N = 4, 3
    ins = [torch.randn(1, E, L), torch.randn(1, E, L), -torch.rand(E, N), torch.randn(1, N, L), torch.randn(1, N, L)]
    ins = [t.double().requires_grad_() for t in ins]
    _fwd_bwd(selective_scan(*ins, delta_softplus=True, return_last_state=True, backend="triton"))


def _causal_conv1d(L):
    x = torch.randn(1, 5, L, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    _fwd_bwd([causal_conv1d(x, w, activation="silu", backend="triton")])


def _gla(per_key):
    def go(L):
        q, k = torch.randn(1, L, 1, 8, dtype=torch.float64), torch.randn(1, L, 1, 8, dtype=torch.float64)
        v = torch.randn(1, L, 1, 8, dtype=torch.float64)
        g = F.logsigmoid(torch.randn(1, L, 1, *((8,) if per_key else ()), dtype=torch.float64))
        ins = [t.requires_grad_() for t in (q, k, v, g)]
        _fwd_bwd(chunk_gla(*ins, output_final_state=True, chunk_size=16, backend="triton"))

    return go


def _delta_rule(L):
    q, k = (F.normalize(torch.randn(1, L, 1, 8, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(1, L, 1, 8, dtype=torch.float64)
    beta, g = torch.rand(1, L, 1, dtype=torch.float64), F.logsigmoid(torch.randn(1, L, 1, dtype=torch.float64))
    ins = [t.requires_grad_() for t in (q, k, v, beta, g)]
    _fwd_bwd(chunk_delta_rule(*ins, output_final_state=True, chunk_size=16, backend="triton"))


def _kernels(module, *names):
    import importlib

    mod = importlib.import_module(module)
    return [getattr(mod, n) for n in names]


CASES = {
    "linear_scan": (_linear_scan, ("zoo.kernels.scan.triton", "_scan_fwd_kernel", "_scan_bwd_kernel")),
    "selective_scan": (_selective_scan, ("zoo.kernels.selective.triton", "_fwd_kernel", "_bwd_kernel")),
    "causal_conv1d": (_causal_conv1d, ("zoo.kernels.conv.triton", "_fwd_kernel", "_bwd_kernel")),
    "chunk_gla_scalar_g": (_gla(False), ("zoo.kernels.gla.triton", "_gla_fwd_kernel", "_gla_bwd_kernel")),
    "chunk_gla_per_key_g": (_gla(True), ("zoo.kernels.gla.triton", "_gla_fwd_kernel", "_gla_bwd_kernel")),
    "chunk_delta_rule": (_delta_rule, ("zoo.kernels.delta_rule.triton", "_fwd_kernel", "_bwd_kernel")),
}
# Lengths chosen to move every length-dependent quantity: 1 (Triton specialises ints equal to 1), a multiple of
# 16 (divisibility specialisation) and lengths with different chunk counts for every chunk size used here.
LENGTHS = (1, 16, 33)


@pytest.mark.parametrize("op", list(CASES))
def test_one_compile_for_every_sequence_length(op, compile_keys):
    go, (module, *names) = CASES[op]
    kernels = _kernels(module, *names)
    keys = compile_keys(*kernels)
    go(LENGTHS[0])
    first = {name: set(ks) for name, ks in keys.items()}  # a pass may launch a kernel in two configs (silu recompute)
    assert set(first) == {k.fn.__name__ for k in kernels}, f"{op}: not every kernel was launched"
    for L in LENGTHS[1:]:
        go(L)
    for name, ks in keys.items():
        new = sorted(ks - first[name])
        assert not new, f"{op}: {name} compiles {len(new)} more variant(s) for lengths {LENGTHS}: {new}"


@triton.jit
def _toy_kernel(X, n, N: tl.constexpr):
    tl.store(X + tl.arange(0, 1), tl.zeros([1], dtype=tl.float32) + n + N)


def test_the_key_sees_a_constexpr_length(compile_keys):
    """The recorder can fail: a length passed as constexpr, or an int specialised on its value, adds variants."""
    keys = compile_keys(_toy_kernel)
    x = torch.zeros(1)
    for n in (3, 5):
        _toy_kernel[(1,)](x, 7, N=n)
    assert len(keys["_toy_kernel"]) == 2
    keys.clear()
    for n in (1, 16, 17):
        _toy_kernel[(1,)](x, n, N=1)  # 1 -> constexpr, 16 -> divisible by 16, 17 -> plain int
    assert len(keys["_toy_kernel"]) == 3


# ----- compiling for a real GPU target, without a GPU ---------------------------------------------------------
def _launch_everything(dtype: torch.dtype) -> None:
    """Call every kernel's host code (bypassing the device checks of the public functions) on CPU tensors."""
    from zoo.kernels.conv.triton import causal_conv1d_triton
    from zoo.kernels.delta_rule.triton import chunk_delta_rule_triton
    from zoo.kernels.gla.triton import gla_triton
    from zoo.kernels.scan.triton import linear_scan_triton
    from zoo.kernels.selective.triton import selective_scan_triton

    def leaf(*shape, dt=dtype):
        return torch.randn(*shape).to(dt).requires_grad_()

    def fwd_bwd(outs):
        outs = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
        torch.autograd.backward(outs, [torch.zeros_like(o) for o in outs])

    L = 40
    fwd_bwd(linear_scan_triton(leaf(2, L, 24), leaf(2, L, 24), leaf(2, 24, dt=torch.float32)))
    fwd_bwd(linear_scan_triton(leaf(1, L, 24), leaf(1, L, 24), reverse=True, cu_seqlens=torch.tensor([0, 9, L])))
    if dtype == torch.float32:
        c = torch.complex64
        fwd_bwd(linear_scan_triton(leaf(2, L, 24, dt=c), leaf(2, L, 24, dt=c), leaf(2, 24, dt=c)))
    f32 = torch.float32
    E, N = 8, 5
    fwd_bwd([selective_scan_triton(leaf(2, E, L), leaf(2, E, L), leaf(E, N, dt=f32), leaf(2, N, L), leaf(2, N, L),
                                   leaf(E, dt=f32), leaf(2, E, L), leaf(E, dt=f32), True, False,
                                   initial_state=leaf(2, E, N, dt=f32))])
    fwd_bwd(selective_scan_triton(leaf(1, E, L), leaf(1, E, L), leaf(E, N, dt=f32), leaf(1, 2, N, L),
                                  leaf(1, 2, N, L), None, None, None, False, True))
    fwd_bwd([causal_conv1d_triton(leaf(2, 24, L), leaf(24, 4), leaf(24), True, None, None)])
    fwd_bwd([causal_conv1d_triton(leaf(1, 24, L), leaf(24, 3), None, False, leaf(1, 24, 2),
                                  torch.arange(L, dtype=torch.int32) % 17)])
    for g in (leaf(2, L, 2), leaf(2, L, 2, 24)):
        fwd_bwd(gla_triton(leaf(2, L, 2, 24), leaf(2, L, 2, 24), leaf(2, L, 2, 96), g, scale=0.2,
                           initial_state=leaf(2, 2, 24, 96, dt=f32), chunk_size=64))
    for g in (None, leaf(1, L, 2)):
        fwd_bwd(chunk_delta_rule_triton(leaf(1, L, 2, 24), leaf(1, L, 2, 24), leaf(1, L, 2, 48), leaf(1, L, 2), g,
                                        scale=0.2, initial_state=leaf(2, 2, 24, 48, dt=f32), output_final_state=True,
                                        cu_seqlens=torch.tensor([0, 15, L]), chunk_size=64))


def compile_all_for_cuda(arch: int = 90) -> list[str]:
    """Compile every kernel launch of ``_launch_everything`` for ``cuda:sm_<arch>``; return what was compiled."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compiling needs the real JIT: unset TRITON_INTERPRET"
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    done: dict[str, str] = {}

    def compile_only(self, *args, grid, warmup, **kwargs):
        bound, spec, options = create_function_from_signature(self.signature, self.params, backend)(*args, **kwargs)
        key = f"{self.fn.__name__} {spec}"
        if key not in done:
            options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec, options)
            triton.compile(ASTSource(self, signature, constexprs, attrs), target=target, options=options.__dict__)
            done[key] = self.fn.__name__
        return None  # nothing is launched: the outputs stay NaN

    JITFunction.run = compile_only
    for dtype in (torch.float32, torch.bfloat16):
        _launch_everything(dtype)
    return sorted(done)


@pytest.mark.slow
def test_every_kernel_compiles_for_a_cuda_target():
    """Every launch configuration compiles down to a cubin for sm_90 (Triton's own compiler, no GPU needed)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, str(Path(__file__))], env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    names = {line.split()[0] for line in res.stdout.splitlines() if line.startswith("_")}
    want = {"_scan_fwd_kernel", "_scan_bwd_kernel", "_fwd_kernel", "_bwd_kernel", "_gla_fwd_kernel", "_gla_bwd_kernel"}
    assert want <= names, res.stdout


if __name__ == "__main__":
    for key in compile_all_for_cuda():
        print(key)
