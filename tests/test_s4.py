"""S4 / S4D: fft_conv against direct convolution, kernels against explicit sums, convolution == recurrence."""

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_left_padded_decode_equals_separate, assert_long_bf16_finite, cached_chunks

from zoo.kernels import fft_conv
from zoo.kernels.long_conv.reference import fft_conv_ref
from zoo.mixers.s4 import S4, hippo_legs_nplr
from zoo.models.cache import RecurrentStateLayer, ZooCache
from zoo.registry import get_mixer

F64 = torch.float64
MODES = [("s4d", "lin"), ("s4d", "inv"), ("s4d", "real"), ("s4d", "legs"), ("dplr", "legs")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(mode: str = "s4d", init: str | None = None, d_model: int = 3, d_state: int = 8, **kw) -> S4:
    m = S4(d_model, d_state=d_state, mode=mode, init=init, **kw).double()
    with torch.no_grad():  # spread dt so that both fast and slow modes matter at short lengths
        m.log_dt.copy_(torch.linspace(math.log(1e-2), math.log(0.5), m.log_dt.numel(), dtype=F64))
    return m


def grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: torch.Tensor) -> list[torch.Tensor]:
    return torch.autograd.grad((out * seed).sum(), inputs, allow_unused=True)


# ----- fft_conv --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kshape", ["causal", "short", "two_sided", "channels"])
def test_fft_conv_matches_direct_convolution(dtype, tol, kshape):
    B, H, L = 2, 3, 11
    u = torch.randn(B, H, L, dtype=dtype, requires_grad=True)
    Lk = {"causal": L, "short": 4, "two_sided": 2 * L, "channels": L}[kshape]
    k = torch.randn(*((2,) if kshape == "channels" else ()), H, Lk, dtype=dtype, requires_grad=True)
    D = torch.randn(k.shape[:-1], dtype=dtype, requires_grad=True)
    y, y_ref = fft_conv(u, k, D), fft_conv_ref(u.double(), k.double(), D.double())
    assert rel(y.double(), y_ref) < tol
    seed = torch.randn_like(y_ref)
    for g, g_ref in zip(grads(y, [u, k, D], seed.to(dtype)), grads(y_ref, [u, k, D], seed)):
        assert rel(g.double(), g_ref.double()) < tol


@pytest.mark.parametrize("call, match", [
    (lambda u: fft_conv(u, torch.randn(3, 5)), "k must be"),
    (lambda u: fft_conv(u, torch.randn(2, 7)), "2L=10"),
    (lambda u: fft_conv(u, torch.randn(2, 5), torch.randn(3)), "D must have shape"),
    (lambda u: fft_conv(u, torch.randn(2, 5), backend="triton"), "no 'triton' kernel"),
])
def test_fft_conv_bad_input_fails_clearly(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(1, 2, 5))


# ----- kernels ---------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["lin", "inv", "real", "legs"])
def test_s4d_kernel_equals_vandermonde_sum(init):
    m = make("s4d", init)
    L = 9
    dt, A, B, C, _ = m._params()
    K = torch.zeros(m.log_dt.numel(), L, dtype=F64)
    for h in range(K.shape[0]):
        for n in range(A.shape[1]):
            a = A[h, n]
            Bbar = B[h, n] * (torch.exp(dt[h] * a) - 1) / a
            for l in range(L):
                K[h, l] += 2 * (C[h, n] * Bbar * torch.exp(dt[h] * a * l)).real
    assert rel(m.kernel(L), K) < 1e-12


def test_dplr_init_is_hippo_legs():
    N = 8
    lam, P, B, V = hippo_legs_nplr(N)
    Vf, Lf, Pf, Bf = (torch.cat([v, v.conj()], dim=-1) for v in (V, lam, P, B))
    n = torch.arange(N, dtype=F64)
    legs = torch.where(n[:, None] > n[None, :], -torch.sqrt((2 * n[:, None] + 1) * (2 * n[None, :] + 1)), torch.zeros(N, N, dtype=F64))
    legs = legs - torch.diag(n + 1)
    A = Vf @ (torch.diag(Lf) - Pf[:, None] * Pf[None, :].conj()) @ Vf.conj().T
    assert rel(A, legs.to(A.dtype)) < 1e-12
    assert rel(Vf @ Bf, torch.sqrt(2 * n + 1).to(A.dtype)) < 1e-12
    assert (lam.real < 0).all() and (lam.imag > 0).all()


@pytest.mark.parametrize("L", [1, 7, 16])
def test_dplr_kernel_matches_dense_discretisation(L):
    m = make("dplr", d_state=6)
    with torch.no_grad():  # move away from the init so that the low-rank term and B, P are generic
        for p in (m.P, m.B, m.log_A_real, m.A_imag):
            p.add_(0.3 * torch.randn_like(p))
    dt, lam, B, C, P = m._params()
    Lf, Pf, Bf, Cf = (torch.cat([v, v.conj()], dim=-1) for v in (lam, P, B, C))
    K = torch.zeros(m.log_dt.numel(), L, dtype=F64)
    for h in range(K.shape[0]):
        A = torch.diag(Lf[h]) - Pf[h][:, None] * Pf[h][None, :].conj()
        eye = torch.eye(A.shape[0], dtype=A.dtype)
        Abar = torch.linalg.inv(eye - dt[h] / 2 * A) @ (eye + dt[h] / 2 * A)  # bilinear
        x = torch.linalg.inv(eye - dt[h] / 2 * A) @ (dt[h] * Bf[h])
        for l in range(L):
            val = Cf[h] @ x
            assert abs(val.imag) < 1e-10  # the conjugate-completed system is real
            K[h, l] = val.real
            x = Abar @ x
    assert rel(m.kernel(L), K) < 1e-10


# ----- convolution == recurrence ----------------------------------------------------------------
@pytest.mark.parametrize("mode,init", MODES)
def test_convolution_equals_recurrence(mode, init):
    """The FFT path and the token-by-token step agree in values, final state and every gradient."""
    m = make(mode, init)
    L = 10
    x = torch.randn(2, L, 3, dtype=F64, requires_grad=True)
    y, st = m.scan(x, return_state=True)
    state = m.init_state(2, dtype=F64)
    ys = []
    for t in range(L):
        yt, state = m.step(x[:, t], state)
        ys.append(yt)
    y_rec = torch.stack(ys, dim=1)
    assert rel(y, y_rec) < 1e-10
    assert rel(st["x"], state["x"]) < 1e-10
    params = [p for p in m.parameters()]
    seed = torch.randn_like(y)
    for g, g_ref in zip(grads(y, [x, *params], seed), grads(y_rec, [x, *params], seed)):
        assert rel(g, g_ref) < 1e-9


@pytest.mark.parametrize("mode", ["s4d", "dplr"])
def test_convolution_equals_recurrence_float32(mode):
    m = S4(8, d_state=32, mode=mode)
    x = torch.randn(2, 96, 8)
    y, st = m.scan(x, return_state=True)
    state = m.init_state(2)
    ys = []
    for t in range(x.shape[1]):
        yt, state = m.step(x[:, t], state)
        ys.append(yt)
    assert rel(y, torch.stack(ys, dim=1)) < 1e-4
    assert rel(st["x"], state["x"]) < 1e-4


@pytest.mark.parametrize("mode", ["s4d", "dplr"])
def test_chunked_prefill_and_decode_match_full_forward(mode):
    bounds = [(0, 5), (5, 9), *((t, t + 1) for t in range(9, 13))]
    out, full, cache = cached_chunks(make(mode), torch.randn(2, 13, 3, dtype=F64), bounds)
    assert rel(out, full) < 1e-10
    assert cache.get_seq_length() == 13


@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_equals_separate(bidirectional):
    m = make("s4d", bidirectional=bidirectional)
    lens = [4, 1, 7]
    xs = [torch.randn(1, n, 3, dtype=F64) for n in lens]
    cu = torch.tensor([0, 4, 5, 12])
    packed = m(torch.cat(xs, dim=1), cu_seqlens=cu)
    assert rel(packed, torch.cat([m(x) for x in xs], dim=1)) < 1e-12


@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_with_an_empty_sequence_equals_separate(bidirectional):
    m = make("s4d", bidirectional=bidirectional)
    xs = [torch.randn(1, n, 3, dtype=F64) for n in (4, 7)]
    packed = m(torch.cat(xs, dim=1), cu_seqlens=torch.tensor([0, 4, 4, 11]))
    assert rel(packed, torch.cat([m(x) for x in xs], dim=1)) < 1e-12


def test_dplr_model_builds_from_config():
    """Config validation builds each layer on the meta device; the HiPPO-LegS init needs real values."""
    import zoo

    model = zoo.build_model({"vocab_size": 32, "d_model": 16, "n_layers": 1, "pattern": ["s4"],
                             "mixers": {"s4": {"d_state": 8, "mode": "dplr"}}})
    assert model.model.layers[0].mixer.P.device.type == "cpu"


@pytest.mark.parametrize("mode", ["s4d", "dplr"])
def test_packed_final_states_equal_separate(mode):
    m = make(mode)
    xs = [torch.randn(1, n, 3, dtype=F64) for n in (3, 6)]
    _, st = m.scan(torch.cat(xs, dim=1), cu_seqlens=torch.tensor([0, 3, 3, 9]), return_state=True)
    sep = torch.cat([m.scan(x, return_state=True)[1]["x"] for x in xs])
    assert rel(st["x"][[0, 2]], sep) < 1e-10
    assert (st["x"][1] == 0).all()  # an empty packed sequence keeps the initial state


@pytest.mark.parametrize("mode", ["s4d", "dplr"])
def test_left_padded_equals_separate(mode):
    """Prefill of a left-padded batch, then decoding, equals each sequence run alone."""
    assert_left_padded_decode_equals_separate(make(mode), [3, 6], 3, 3)


@pytest.mark.parametrize("side", ["left", "right"])
def test_bidirectional_padding_equals_separate(side):
    m = make("s4d", bidirectional=True)
    seq = torch.randn(1, 5, 3, dtype=F64)
    pad = torch.randn(1, 3, 3, dtype=F64)
    x = torch.cat([pad, seq] if side == "left" else [seq, pad], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]) if side == "left" else torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    y = m(x, attention_mask=mask)
    real = y[:, 3:] if side == "left" else y[:, :5]
    assert rel(real, m(seq)) < 1e-12


def test_bidirectional_is_a_two_sided_convolution():
    m = make("s4d", bidirectional=True)
    L, H = 7, 3
    x = torch.randn(2, L, H, dtype=F64)
    k = m.kernel(L)  # (2H, L): forward then backward kernels
    u = x.transpose(1, 2)
    pre = torch.zeros_like(u)
    for t in range(L):
        for s in range(L):
            pre[..., t] += k[:H, t - s] * u[..., s] if s <= t else k[H:, s - t - 1] * u[..., s]
    pre = pre + m.D[:, None] * u
    assert rel(m(x), m._output(pre.transpose(1, 2))) < 1e-12
    assert not m.causal and not m.has_step and m.state_size() == 2 * H * m.d_state


# ----- bf16 long sequences -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["s4d", "dplr"])
def test_long_sequence_bf16_is_finite(mode):
    assert_long_bf16_finite(S4(4, d_state=16, mode=mode).to(torch.bfloat16), 4)


# ----- configuration and bad input -----------------------------------------------------------------
def test_registry_and_yaml():
    assert get_mixer("s4") is S4
    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "s4.yaml").read_text())
    m = get_mixer("s4")(cfg["model"]["d_model"], **cfg["model"]["mixers"]["s4"])
    assert m.state_size() == cfg["model"]["d_model"] * m.d_state


@pytest.mark.parametrize("kwargs, match", [
    ({"d_state": 7}, "even"),
    ({"mode": "s5"}, "mode must be"),
    ({"init": "legt"}, "init for mode 's4d'"),
    ({"mode": "dplr", "init": "lin"}, "HiPPO-LegS only"),
    ({"dt_min": 0.1, "dt_max": 0.01}, "dt_min"),
])
def test_bad_config_fails_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S4(4, **kwargs)


def test_bad_input_fails_clearly():
    bi = S4(4, d_state=4, bidirectional=True)
    with pytest.raises(RuntimeError, match="not causal"):
        bi.step(torch.randn(1, 4), {})
    with pytest.raises(ValueError, match="without a cache"):
        bi(torch.randn(1, 3, 4), cache=ZooCache([RecurrentStateLayer()]))
    m = S4(4, d_state=4)
    with pytest.raises(ValueError, match="pad on the left"):
        m(torch.randn(1, 4, 4), attention_mask=torch.tensor([[1, 0, 1, 1]]))
    with pytest.raises(ValueError, match="pad on the left"):
        m(torch.randn(1, 4, 4), attention_mask=torch.tensor([[1, 1, 0, 0]]), cache=ZooCache([RecurrentStateLayer()]))
    with pytest.raises(ValueError, match="batch size 1"):
        m(torch.randn(2, 4, 4), cu_seqlens=torch.tensor([0, 2, 4]))
    x = torch.randn(1, 4, 4)
    assert torch.isfinite(m(x, attention_mask=torch.tensor([[1, 1, 0, 0]]))).all()  # right padding is fine without a state
