"""The tiled LM-head loss: equal to the untiled float64 loss and gradients, and three head matmuls per tile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from zoo.models.loss import IGNORE_INDEX, tiled_linear_cross_entropy


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm):
            self.n += 1
        return func(*args, **(kwargs or {}))


class _CountBigAllocations(TorchDispatchMode):
    """Ops that return a fresh tensor of at least ``size`` elements (in-place and ``out=`` ops write existing ones; views share them)."""

    def __init__(self, size):
        super().__init__()
        self.size, self.n = size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (not func._schema.is_mutable and isinstance(out, torch.Tensor) and func._schema.returns[0].alias_info is None
                and out.numel() >= self.size):
            self.n += 1
        return out


def _data(dtype, n=300, d=32, v=500):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = torch.randn(v, d, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[::7] = IGNORE_INDEX
    return h, w, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_tiled_loss_and_gradients_equal_untiled_float64(dtype):
    h, w, t = _data(dtype)
    loss, preds = tiled_linear_cross_entropy(h, w, t, chunk_size=64)
    (loss * 0.37).backward()  # a grad_out other than 1 (gradient accumulation scales the loss)
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(F.linear(hd, wd), t, ignore_index=IGNORE_INDEX)
    (ref * 0.37).backward()
    tol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    assert loss.detach().item() == pytest.approx(ref.detach().item(), rel=tol)
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=tol, atol=tol * 1e-2)
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=tol, atol=tol * 1e-2)
    assert torch.equal(preds, F.linear(h, w).float().argmax(-1))


def test_tiled_loss_forms_gradients_in_forward_three_matmuls_per_tile():
    h, w, t = _data(torch.float32)
    with _CountMatmuls() as count:
        loss, _ = tiled_linear_cross_entropy(h, w, t, chunk_size=100, with_preds=False)
        loss.backward()
    assert count.n == 3 * 3  # logits, d hidden, d weight per tile; the backward recomputes nothing
    with torch.no_grad(), _CountMatmuls() as count:
        loss_ng, preds = tiled_linear_cross_entropy(h, w, t, chunk_size=100, with_preds=False)
    assert count.n == 3 and preds.numel() == 0 and loss_ng.item() == pytest.approx(loss.detach().item(), rel=1e-6)


def test_tiled_loss_reuses_one_logits_buffer():
    """One (chunk, V) tensor for the whole loss, softmaxed in place: the old code allocated two per tile (the logits and
    log_softmax's result), whose page faults cost ~10 % of the head on CPU."""
    h, w, t = _data(torch.float32)
    with _CountBigAllocations(100 * w.shape[0]) as count:
        loss, _ = tiled_linear_cross_entropy(h, w, t, chunk_size=100, with_preds=False)
        loss.backward()
    assert count.n == 1
