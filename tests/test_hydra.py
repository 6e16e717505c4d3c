"""Hydra: equal to its explicit quasiseparable matrix; packing and padding; no step path."""

from pathlib import Path

import pytest
import torch
import yaml

from zoo.mixers.hydra import Hydra
from zoo.models.cache import RecurrentStateLayer, ZooCache
from zoo.registry import get_mixer

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(**kw) -> Hydra:
    kw = {"d_state": 4, "headdim": 4, "ngroups": 2, "chunk_size": 4, "d_conv": 3, **kw}
    m = Hydra(8, **kw).double()
    with torch.no_grad():  # spread the decays so that the matrix is far from low-order
        m.dt_bias.add_(1.5)
        m.A_log.copy_(torch.linspace(-1.0, 0.5, m.nheads, dtype=F64))
    return m


def quasiseparable_mix(m: Hydra, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix with the explicitly built L x L matrix per (batch, head), from the SSD decays and B/C."""
    z, x, dt_f, dt_b, Bf, Cf, Bb, Cb = m.project(u)
    Bsz, L, H, P = x.shape
    A = -torch.exp(m.A_log)
    grp = torch.arange(H) // (H // m.ngroups)
    diag = m.fc_D(x.reshape(Bsz, L, -1)) + m.D  # (B, L, H)
    y = torch.zeros_like(x)
    for b in range(Bsz):
        for h in range(H):
            g = grp[h]
            M = torch.zeros(L, L, dtype=F64)
            for i in range(L):
                M[i, i] = diag[b, i, h]
                for j in range(i):  # forward scan, shifted: row i reads the state after token i-1
                    decay = torch.exp(A[h] * dt_f[b, j + 1 : i, h].sum())
                    M[i, j] = (Cf[b, i - 1, g] @ Bf[b, j, g]) * dt_f[b, j, h] * decay
                for j in range(i + 1, L):  # backward scan, shifted: row i reads the state after token i+1
                    decay = torch.exp(A[h] * dt_b[b, i + 1 : j, h].sum())
                    M[i, j] = (Cb[b, i + 1, g] @ Bb[b, j, g]) * dt_b[b, j, h] * decay
            y[b, :, h] = M @ x[b, :, h]
    return y.reshape(Bsz, L, -1), z


@pytest.mark.parametrize("ngroups", [1, 2])
def test_output_equals_quasiseparable_matrix(ngroups):
    """Values and every gradient of the SSD-based forward equal the explicit matrix multiplication."""
    m = make(ngroups=ngroups)
    u = torch.randn(2, 9, 8, dtype=F64, requires_grad=True)
    (y, _), (y_ref, z) = m.mix(u), quasiseparable_mix(m, u)
    assert rel(y, y_ref) < 1e-10
    assert rel(m(u), m.out_proj(m.norm(y_ref, z))) < 1e-6  # the norm runs in float32
    params = list(m.parameters())
    seed = torch.randn_like(y)
    g = torch.autograd.grad((y * seed).sum(), [u, *params], allow_unused=True)
    g_ref = torch.autograd.grad((y_ref * seed).sum(), [u, *params], allow_unused=True)
    assert sum(a is not None for a in g) == 1 + len(params) - 2  # u and all but the norm weight and out_proj
    for a, b in zip(g, g_ref):
        assert (a is None and b is None) or rel(a, b) < 1e-9


def test_every_position_sees_both_directions():
    m = make()
    u = torch.randn(1, 6, 8, dtype=F64, requires_grad=True)
    m(u)[0, 2].sum().backward()
    assert (u.grad[0].abs().sum(-1) > 0).all()


def test_packed_equals_separate():
    m = make()
    lens = [5, 1, 2, 7]
    xs = [torch.randn(1, n, 8, dtype=F64) for n in lens]
    cu = torch.tensor([0, 5, 6, 8, 15], dtype=torch.int32)
    packed = m(torch.cat(xs, dim=1), cu_seqlens=cu)
    assert rel(packed, torch.cat([m(x) for x in xs], dim=1)) < 1e-10


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_equals_separate(side):
    m = make()
    lens, T = [3, 7], 7
    seqs = [torch.randn(1, n, 8, dtype=F64) for n in lens]
    x = torch.randn(2, T, 8, dtype=F64)  # garbage in the pads must not leak into real positions
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(lens):
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        x[b, sl] = seqs[b][0]
        mask[b, sl] = 1
    y = m(x, attention_mask=mask)
    for b, n in enumerate(lens):
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        assert rel(y[b, sl], m(seqs[b])[0]) < 1e-10


def test_registry_and_yaml():
    assert get_mixer("hydra") is Hydra
    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "hydra.yaml").read_text())
    m = get_mixer("hydra")(cfg["model"]["d_model"], **cfg["model"]["mixers"]["hydra"])
    assert m(torch.randn(1, 5, cfg["model"]["d_model"])).shape == (1, 5, cfg["model"]["d_model"])
    assert not m.causal and not m.has_step


def test_bad_input_fails_clearly():
    m = make()
    with pytest.raises(RuntimeError, match="not causal"):
        m.step(torch.randn(1, 8, dtype=F64), {})
    with pytest.raises(ValueError, match="without a cache"):
        m(torch.randn(1, 3, 8, dtype=F64), cache=ZooCache([RecurrentStateLayer()]))
    with pytest.raises(ValueError, match="d_conv must be odd"):
        Hydra(8, d_conv=4, headdim=4)
    with pytest.raises(ValueError, match="headdim 12 must divide"):
        Hydra(8, headdim=12)
    with pytest.raises(ValueError, match="ngroups 3 must divide"):
        Hydra(8, headdim=4, ngroups=3)
