"""Mamba-2: transformers parity, chunked scan == step recurrence, decode, packing, padding, long bf16."""

from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_left_padded_decode_equals_separate, assert_long_bf16_finite, run_steps
from transformers import Mamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from zoo.mixers.mamba2 import Mamba2
from zoo.models.cache import RecurrentStateLayer, ZooCache
from zoo.registry import get_mixer

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(dtype=F64, **kw) -> Mamba2:
    kw = {"d_state": 8, "headdim": 4, "ngroups": 2, "chunk_size": 4, **kw}
    m = Mamba2(8, **kw).to(dtype)
    with torch.no_grad():  # larger dt than the init so decays matter over a few tokens
        m.dt_bias.add_(2.0)
    return m


@pytest.mark.parametrize("ngroups", [1, 2])
def test_matches_transformers_mamba2_mixer(ngroups):
    cfg = Mamba2Config(
        hidden_size=16, state_size=8, expand=2, head_dim=8, num_heads=4, n_groups=ngroups, conv_kernel=4,
        chunk_size=8, layer_norm_epsilon=1e-5, num_hidden_layers=1, use_bias=False, use_conv_bias=True,
    )
    ref = Mamba2Mixer(cfg, layer_idx=0).eval()
    m = Mamba2(16, d_state=8, headdim=8, ngroups=ngroups, chunk_size=8, norm_eps=1e-5)
    missing = m.load_state_dict(ref.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    x = torch.randn(2, 21, 16)
    with torch.no_grad():
        assert rel(m(x), ref(x)) < 1e-4


@pytest.mark.parametrize("ngroups", [1, 2])
def test_chunked_scan_equals_recurrence(ngroups):
    """The ssd path and the O(1) step agree in values, final states and every gradient (float64)."""
    m = make(ngroups=ngroups)
    x = torch.randn(2, 11, 8, dtype=F64, requires_grad=True)
    y, st = m.scan(x, return_state=True)
    y_rec, st_rec = run_steps(m, x)
    assert rel(y, y_rec) < 1e-10
    for k in st:
        assert rel(st[k], st_rec[k]) < 1e-10
    params = list(m.parameters())
    seed = torch.randn_like(y)
    g = torch.autograd.grad((y * seed).sum(), [x, *params])
    g_rec = torch.autograd.grad((y_rec * seed).sum(), [x, *params])
    for a, b in zip(g, g_rec):
        assert rel(a, b) < 1e-9


def test_chunked_scan_equals_recurrence_float32():
    m = Mamba2(16, d_state=16, headdim=8, ngroups=2, chunk_size=16)
    x = torch.randn(2, 70, 16)
    y, st = m.scan(x, return_state=True)
    y_rec, st_rec = run_steps(m, x)
    assert rel(y, y_rec) < 1e-4
    assert rel(st["ssm"], st_rec["ssm"]) < 1e-4


def test_chunk_size_does_not_change_output():
    m = make()
    x = torch.randn(2, 13, 8, dtype=F64)
    y = m(x)
    m.chunk_size = 16
    assert rel(m(x), y) < 1e-12


def test_chunked_prefill_and_decode_match_full_forward():
    m = make()
    x = torch.randn(2, 12, 8, dtype=F64)
    full = m(x)
    cache = ZooCache([RecurrentStateLayer()])
    parts = [m(x[:, :2], cache=cache), m(x[:, 2:7], cache=cache)]
    parts += [m(x[:, t : t + 1], cache=cache) for t in range(7, 12)]
    assert rel(torch.cat(parts, dim=1), full) < 1e-10


def test_packed_equals_separate():
    m = make()
    lens = [5, 1, 2, 6]
    xs = [torch.randn(1, n, 8, dtype=F64) for n in lens]
    cu = torch.tensor([0, 5, 6, 8, 14], dtype=torch.int32)
    y, st = m.scan(torch.cat(xs, dim=1), cu_seqlens=cu, return_state=True)
    sep = [m.scan(x, return_state=True) for x in xs]
    assert rel(y, torch.cat([s[0] for s in sep], dim=1)) < 1e-10
    for k in ("conv", "ssm"):
        assert rel(st[k], torch.cat([s[1][k] for s in sep])) < 1e-10


def test_left_padded_equals_separate():
    """Left-padded prefill then decoding equals each sequence run alone (pads are the identity)."""
    assert_left_padded_decode_equals_separate(make(), [2, 6], 3, 8, pad=torch.randn)


def test_padded_decode_token_keeps_state():
    m = make()
    x = torch.randn(1, 5, 8, dtype=F64)
    cache = ZooCache([RecurrentStateLayer()])
    m(x[:, :3], cache=cache)
    m(torch.randn(1, 1, 8, dtype=F64), cache=cache, attention_mask=torch.tensor([[1, 1, 1, 0]]))
    y = m(x[:, 3:4], cache=cache, attention_mask=torch.tensor([[1, 1, 1, 0, 1]]))
    assert rel(y[:, 0], m(x[:, :4])[:, 3]) < 1e-10


def test_long_sequence_bf16_is_finite():
    assert_long_bf16_finite(Mamba2(16, d_state=8, headdim=8, chunk_size=256).to(torch.bfloat16), 16)


def test_init_and_state_size():
    m = Mamba2(32, d_state=16, headdim=16, ngroups=2)
    A = torch.exp(m.A_log)
    assert ((A >= 1) & (A <= 16)).all()
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert ((dt >= 1e-4 - 1e-7) & (dt <= 0.1 + 1e-6)).all()
    assert m.conv1d.weight.shape == (m.conv_dim, 1, 4)
    assert m.state_size() == m.conv_dim * 3 + 4 * 16 * 16


def test_registry_and_yaml():
    assert get_mixer("mamba2") is Mamba2
    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "mamba2.yaml").read_text())
    m = get_mixer("mamba2")(cfg["model"]["d_model"], **cfg["model"]["mixers"]["mamba2"])
    assert m(torch.randn(1, 5, cfg["model"]["d_model"])).shape == (1, 5, cfg["model"]["d_model"])


def test_bad_input_fails_clearly():
    with pytest.raises(ValueError, match="headdim 48 must divide"):
        Mamba2(32, headdim=48)
    with pytest.raises(ValueError, match="ngroups 3 must divide"):
        Mamba2(32, headdim=16, ngroups=3)
    with pytest.raises(ValueError, match="d_conv=5 is not supported"):
        Mamba2(32, headdim=16, d_conv=5)
    m = make()
    st = m.init_state(1, dtype=F64)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m.scan(torch.randn(1, 4, 8, dtype=F64), state=st, cu_seqlens=torch.tensor([0, 2, 4]))
