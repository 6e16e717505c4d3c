"""RetNet: parallel == chunkwise == recurrent, decode after prefill, packing, padding, stability, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_chunks, run_steps

from zoo.mixers.retnet import RetNet
from zoo.models.cache import RecurrentStateLayer, ZooCache
from zoo.registry import get_mixer

F64 = torch.float64


def make(mode="chunk", d_model=32, dtype=F64, **kw):
    return RetNet(d_model, layer_idx=0, mode=mode, chunk_size=kw.pop("chunk_size", 16), **kw).to(dtype)


def test_registered():
    assert get_mixer("retnet") is RetNet


def test_parallel_equals_chunk_equals_recurrent():
    m = make()
    x = torch.randn(2, 45, 32, dtype=F64)
    y_chunk, s_chunk = m.scan(x, return_state=True)
    m.mode = "parallel"
    y_par, s_par = m.scan(x, return_state=True)
    y_rec, s_rec = run_steps(m, x)
    torch.testing.assert_close(y_par, y_chunk)
    torch.testing.assert_close(y_rec, y_chunk)
    for s in (s_par, s_rec):
        torch.testing.assert_close(s["S"], s_chunk["S"])
        assert torch.equal(s["pos"], s_chunk["pos"])


def test_forms_agree_in_float32_with_gradients():
    torch.manual_seed(1)
    m = make(dtype=torch.float32)
    x = torch.randn(2, 40, 32, requires_grad=True)
    grads = []
    for mode in ("chunk", "parallel"):
        m.mode = mode
        y, _ = m.scan(x)
        grads.append(torch.autograd.grad((y * torch.linspace(-1, 1, 32)).sum(), [x, *m.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["chunk", "parallel"])
def test_decode_matches_full_forward(mode):
    bounds = [(0, 13), (13, 21), *((t, t + 1) for t in range(21, 30))]  # prefill, chunked prefill, O(1) steps
    out, full, cache = cached_chunks(make(mode), torch.randn(2, 30, 32, dtype=F64), bounds)
    torch.testing.assert_close(out, full)
    assert cache.get_seq_length() == 30


@pytest.mark.parametrize("mode", ["chunk", "parallel"])
def test_packed_equals_separate(mode):
    m = make(mode)
    lens = [9, 20, 1, 14]
    xs = [torch.randn(1, n, 32, dtype=F64) for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    y, state = m.scan(torch.cat(xs, 1), cu_seqlens=cu, return_state=True)
    for i, xi in enumerate(xs):
        yi, si = m.scan(xi, return_state=True)
        torch.testing.assert_close(y[:, int(cu[i]) : int(cu[i + 1])], yi)
        torch.testing.assert_close(state["S"][i : i + 1], si["S"])
        assert int(state["pos"][i]) == lens[i]


@pytest.mark.parametrize("mode", ["chunk", "parallel"])
def test_left_padded_equals_separate(mode):
    m = make(mode)
    lens = [25, 11, 17]
    L = max(lens)
    xs = [torch.randn(1, n, 32, dtype=F64) for n in lens]
    x = torch.cat([torch.cat([torch.randn(1, L - n, 32, dtype=F64), xi], 1) for n, xi in zip(lens, xs)])
    mask = torch.stack([torch.arange(L) >= L - n for n in lens]).long()
    cache = ZooCache([RecurrentStateLayer()])
    y = m(x, cache=cache, attention_mask=mask)
    nxt = torch.randn(3, 4, 32, dtype=F64)
    steps = []
    for t in range(4):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        steps.append(m(nxt[:, t : t + 1], cache=cache, attention_mask=mask))
    for i, (n, xi) in enumerate(zip(lens, xs)):
        want = m(torch.cat([xi, nxt[i : i + 1]], 1))
        torch.testing.assert_close(y[i : i + 1, L - n :], want[:, :n])
        torch.testing.assert_close(torch.cat(steps, 1)[i : i + 1], want[:, n:])


def test_padded_decode_step_keeps_state():
    m = make()
    cache = ZooCache([RecurrentStateLayer()])
    x = torch.randn(2, 6, 32, dtype=F64)
    m(x, cache=cache)
    before = {k: v.clone() for k, v in cache.layers[0].states.items()}
    m(torch.randn(2, 1, 32, dtype=F64), cache=cache, attention_mask=torch.tensor([[1] * 6 + [0], [1] * 7]))
    after = cache.layers[0].states
    assert torch.equal(after["S"][0], before["S"][0]) and int(after["pos"][0]) == 6
    assert not torch.equal(after["S"][1], before["S"][1]) and int(after["pos"][1]) == 7


def test_long_sequence_bf16_is_finite():
    m = make(d_model=16, dtype=torch.bfloat16, n_heads=2, chunk_size=64)
    x = torch.randn(1, 16384, 16, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    y.float().square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_state_size_and_shapes():
    m = make(d_model=64, n_heads=4, value_factor=2)
    assert m.state_size() == 4 * 16 * 32
    st = m.init_state(3)
    assert st["S"].shape == (3, 4, 16, 32) and st["pos"].shape == (3,)
    assert m(torch.randn(3, 5, 64, dtype=F64)).shape == (3, 5, 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"d_model": 30, "n_heads": 4}, "must divide d_model"),
        ({"d_model": 12, "n_heads": 4}, "must be even for rotary"),
        ({"d_model": 32, "value_factor": 0}, "value_factor"),
        ({"d_model": 32, "mode": "recurrent"}, "mode must be one of"),
    ],
)
def test_bad_config_raises_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetNet(kwargs.pop("d_model"), **kwargs)
