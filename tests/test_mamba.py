"""The Mamba mixer: transformers parity, step == scan, padding, packing, init."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer

from zoo import get_mixer
from zoo.mixers.mamba import Mamba
from zoo.models.cache import RecurrentStateLayer, ZooCache

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(d_model=16, dtype=F64, **kw) -> Mamba:
    torch.manual_seed(0)
    m = Mamba(d_model, **{"d_state": 4, **kw}).to(dtype)
    with torch.no_grad():  # larger dt than the init so the state matters over a few steps
        m.dt_proj.bias.add_(2.0)
    return m


def new_cache() -> ZooCache:
    return ZooCache([RecurrentStateLayer()])


def test_registered_with_mamba_simple_parameter_names_and_shapes():
    assert get_mixer("mamba") is Mamba
    m = Mamba(32)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    E, R, N = 64, 2, 16
    assert shapes == {
        "in_proj.weight": (2 * E, 32), "conv1d.weight": (E, 1, 4), "conv1d.bias": (E,), "x_proj.weight": (R + 2 * N, E),
        "dt_proj.weight": (E, R), "dt_proj.bias": (E,), "A_log": (E, N), "D": (E,), "out_proj.weight": (32, E),
    }
    assert m.state_size() == E * (3 + N)


@pytest.mark.parametrize("L", [1, 23])
def test_matches_transformers_mamba_mixer(L):
    torch.manual_seed(0)
    m = Mamba(32, d_state=8, expand=2, d_conv=4)
    cfg = MambaConfig(hidden_size=32, state_size=8, expand=2, conv_kernel=4, time_step_rank=m.dt_rank,
                      use_conv_bias=True, use_bias=False, num_hidden_layers=1)
    hf = MambaMixer(cfg, 0).eval()
    hf.load_state_dict(m.state_dict())  # strict: the names and shapes map one to one
    x = torch.randn(2, L, 32)
    with torch.no_grad():
        assert rel_err(m(x), hf(x)) < 1e-4


def test_init_follows_mamba_simple():
    m = Mamba(64, d_state=16, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4)
    assert torch.allclose(m.A_log, torch.log(torch.arange(1, 17.0)).expand(128, 16))
    assert torch.equal(m.D, torch.ones(128))
    from zoo.train.optim import no_decay_names

    assert {"A_log", "D"} <= no_decay_names(m) and "in_proj.weight" not in no_decay_names(m)
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert m.dt_rank == math.ceil(64 / 16)
    std = m.dt_rank**-0.5
    assert m.dt_proj.weight.abs().max() <= std
    const = Mamba(64, dt_init="constant", dt_scale=2.0)
    assert torch.allclose(const.dt_proj.weight, torch.full_like(const.dt_proj.weight, 2.0 * const.dt_rank**-0.5))


def test_decode_matches_full_forward():
    m = make()
    x = torch.randn(2, 12, 16, dtype=F64)
    full = m(x)
    cache = new_cache()
    ys = [m(x[:, :5], cache=cache)]  # prefill, then one token at a time through the step path
    for t in range(5, 12):
        ys.append(m(x[:, t : t + 1], cache=cache))
    assert rel_err(torch.cat(ys, 1), full) < 1e-10
    assert cache.get_seq_length() == 12


def test_step_equals_scan_float32():
    m = make(dtype=torch.float32)
    x = torch.randn(2, 9, 16)
    full, state = m.scan(x, return_state=True)
    s = m.init_state(2, dtype=torch.float32)
    ys = []
    for t in range(9):
        y, s = m.step(x[:, t], s)
        ys.append(y)
    assert rel_err(torch.stack(ys, 1), full) < 1e-4
    for k in state:
        assert rel_err(s[k], state[k]) < 1e-4


def test_chunked_prefill_matches_one_prefill():
    m = make()
    x = torch.randn(2, 14, 16, dtype=F64)
    y, state = m.scan(x, return_state=True)
    y1, s = m.scan(x[:, :2], return_state=True)  # shorter than the conv state
    y2, s = m.scan(x[:, 2:9], state=s, return_state=True)
    y3, s = m.scan(x[:, 9:], state=s, return_state=True)
    assert rel_err(torch.cat([y1, y2, y3], 1), y) < 1e-10
    for k in state:
        assert rel_err(s[k], state[k]) < 1e-10


def test_left_padded_batch_equals_separate():
    m = make()
    lens, T = [9, 4], 9
    seqs = [torch.randn(1, n, 16, dtype=F64) for n in lens]
    x = torch.cat([torch.cat([torch.randn(1, T - n, 16, dtype=F64), s], 1) for n, s in zip(lens, seqs)])  # junk pads
    mask = torch.stack([torch.arange(T) >= T - n for n in lens]).long()
    cache = new_cache()
    y = m(x, cache=cache, attention_mask=mask)
    nxt = torch.randn(2, 1, 16, dtype=F64)
    y_next = m(nxt, cache=cache, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1))
    for i, (n, s) in enumerate(zip(lens, seqs)):
        c = new_cache()
        alone = m(s, cache=c)
        assert rel_err(y[i : i + 1, T - n :], alone) < 1e-10
        assert rel_err(y_next[i : i + 1], m(nxt[i : i + 1], cache=c)) < 1e-10


def test_packed_equals_separate():
    m = make()
    lens = [5, 1, 7]
    seqs = [torch.randn(1, n, 16, dtype=F64) for n in lens]
    cu = torch.tensor([0, 5, 6, 13])
    y = m(torch.cat(seqs, 1), cu_seqlens=cu)
    for s, (a, b) in zip(seqs, zip(cu[:-1].tolist(), cu[1:].tolist())):
        assert rel_err(y[:, a:b], m(s)) < 1e-10
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.cat(seqs, 1), cu_seqlens=cu, cache=new_cache())


def test_triton_kernels_equal_torch_kernels_in_the_mixer(monkeypatch):
    import functools

    import zoo.mixers.mamba as mod

    m = make(d_model=4, d_state=2)
    x = torch.randn(2, 6, 4, dtype=F64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    state = m.init_state(2, dtype=F64)
    state["ssm"].normal_()
    ref = [m.scan(x, state=state, return_state=True), m.scan(x, mask=mask, return_state=True)]
    monkeypatch.setattr(mod, "selective_scan", functools.partial(mod.selective_scan, backend="triton"))
    monkeypatch.setattr(mod, "causal_conv1d", functools.partial(mod.causal_conv1d, backend="triton"))
    got = [m.scan(x, state=state, return_state=True), m.scan(x, mask=mask, return_state=True)]
    for (y_r, s_r), (y_g, s_g) in zip(ref, got):
        assert rel_err(y_g, y_r) < 1e-10
        for k in s_r:
            assert rel_err(s_g[k], s_r[k]) < 1e-10


def test_gradients_reach_every_parameter():
    m = make(dtype=torch.float32)
    m(torch.randn(2, 10, 16)).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_long_sequence_bf16_is_finite():
    torch.manual_seed(0)
    m = Mamba(16, d_state=8).to(torch.bfloat16)
    x = torch.randn(1, 16384, 16, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"d_conv": 5}, "d_conv"), ({"dt_init": "uniform"}, "dt_init"), ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min"),
])
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba(16, **kwargs)


def test_config_file_builds_a_trainable_model():
    import zoo

    cfg = zoo.load_config("configs/mamba.yaml", overrides=["model.d_model=32", "model.n_layers=2", "model.vocab_size=64"])
    model = zoo.build_model(cfg)
    ids = torch.randint(0, 64, (2, 12))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    greedy = model.generate(ids[:, :4], max_new_tokens=4, do_sample=False)
    assert greedy.shape == (2, 8)
