"""RMSNorm / GatedRMSNorm against float64 formulas, and the compiled CPU gated norm against the eager one."""

from __future__ import annotations

import pytest
import torch

from zoo.nn.norm import GatedRMSNorm

F64 = torch.float64


def _ref(y, z, w, eps, gs, before):
    """The float64 formula, written out: RMSNorm(y * silu(z)) or RMSNorm(y) * silu(z), per group of gs channels."""
    shape = y.shape
    gate = (z * torch.sigmoid(z)).reshape(*shape[:-1], -1, gs)
    u = y.reshape(*shape[:-1], -1, gs)
    u = u if before else u * gate
    out = u / torch.sqrt((u * u).mean(-1, keepdim=True) + eps) * w.reshape(-1, gs)
    return (out * gate if before else out).reshape(shape)


def _grads(norm, y, z, gen):
    out = norm(y, z)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    return [out, *torch.autograd.grad(loss, [y, z, norm.weight])]


@pytest.mark.parametrize("mode", ["never", "always"])
@pytest.mark.parametrize("before,group", [(False, None), (True, 4)])
def test_gated_rms_norm_equals_float64_formula(mode, before, group, monkeypatch):
    """Eager and compiled (ZOO_CPU_COMPILE=always) paths: output and the gradients of y, z and the weight."""
    from zoo.kernels import _compile

    monkeypatch.setenv("ZOO_CPU_COMPILE", mode)
    calls = []
    real = _compile.run_compiled
    monkeypatch.setattr("zoo.nn.norm.run_compiled", lambda op, name, *a: calls.append(op) or real(op, name, *a))
    gen = torch.Generator().manual_seed(0)
    norm = GatedRMSNorm(8, eps=1e-5, norm_before_gate=before, group_size=group).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=gen, dtype=F64))
    y = torch.randn(2, 3, 8, generator=gen, dtype=F64, requires_grad=True)
    z = torch.randn(2, 3, 8, generator=gen, dtype=F64, requires_grad=True)
    got = _grads(norm, y, z, torch.Generator().manual_seed(1))
    w = norm.weight.detach().clone().requires_grad_()
    ref_out = _ref(y, z, w, 1e-5, group or 8, before)
    loss = (ref_out * torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(1), dtype=F64)).sum()
    ref = [ref_out, *torch.autograd.grad(loss, [y, z, w])]
    assert calls == (["gated_rms_norm"] if mode == "always" else [])
    for name, a, b in zip(("out", "dy", "dz", "dweight"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
