"""MoM (Mixture-of-Memories): routing, memory isolation, aux loss, capacity, and the scan/step/cache/packing oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import run_steps

import zoo
from zoo.kernels import triton_available
from zoo.kernels.delta_rule.reference import delta_rule_reference
from zoo.mixers.mom import MoM
from zoo.models.cache import RecurrentStateLayer, ZooCache

D = 32


def make(**kw) -> MoM:
    torch.manual_seed(0)
    return MoM(D, **{"n_heads": 2, "head_dim": 16, "chunk_size": 8, **kw}).double().eval()


@pytest.mark.parametrize("memory", ["gated_delta", "gla"])
@pytest.mark.parametrize("shared", [True, False])
def test_scan_equals_step(memory, shared):
    m = make(memory=memory, shared_memory=shared)
    x = torch.randn(2, 19, D, dtype=torch.float64)
    y, s = m.scan(x, return_state=True)
    y2, s2 = run_steps(m, x)
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-10)
    for key in s:
        torch.testing.assert_close(s[key], s2[key], rtol=1e-10, atol=1e-10)


def test_scan_gradients_equal_step_gradients():
    m = make()
    x = torch.randn(2, 11, D, dtype=torch.float64, requires_grad=True)
    params = [x, *m.parameters()]
    w = torch.randn(2, 11, D, dtype=torch.float64)
    g_scan = torch.autograd.grad((m.scan(x)[0] * w).sum(), params)
    g_step = torch.autograd.grad((run_steps(m, x)[0] * w).sum(), params)
    names = ["x", *(n for n, _ in m.named_parameters())]
    for name, a, b in zip(names, g_scan, g_step):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda s, n=name: f"d{n}: {s}")
    assert g_scan[names.index("router.weight")].abs().sum() > 0


@pytest.mark.parametrize("memory", ["gated_delta", "gla"])
def test_decode_after_prefill_matches_full_forward(memory):
    m = make(memory=memory)
    x = torch.randn(2, 15, D, dtype=torch.float64)
    full = m(x)
    cache = ZooCache([RecurrentStateLayer()])
    out = [m(x[:, :4], cache=cache), m(x[:, 4:9], cache=cache)]  # prefill, then chunked prefill
    out += [m(x[:, t : t + 1], cache=cache) for t in range(9, 15)]
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-10, atol=1e-10)


def test_packed_equals_separate():
    m = make()
    lens = [7, 1, 12]
    xs = [torch.randn(1, n, D, dtype=torch.float64) for n in lens]
    cu = torch.tensor([0, 7, 8, 20])
    y, s = m.scan(torch.cat(xs, 1), cu_seqlens=cu, return_state=True)
    for i, xi in enumerate(xs):
        yi, si = m.scan(xi, return_state=True)
        torch.testing.assert_close(y[:, int(cu[i]) : int(cu[i + 1])], yi, rtol=1e-10, atol=1e-10)
        for key in s:
            torch.testing.assert_close(s[key][i : i + 1], si[key], rtol=1e-10, atol=1e-10)


def test_left_padded_equals_separate():
    m = make()
    a, b = torch.randn(1, 10, D, dtype=torch.float64), torch.randn(1, 6, D, dtype=torch.float64)
    batch = torch.cat([a, torch.cat([torch.randn(1, 4, D, dtype=torch.float64), b], 1)])
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    y, s = m.scan(batch, mask=mask, return_state=True)
    ya, sa = m.scan(a, return_state=True)
    yb, sb = m.scan(b, return_state=True)
    torch.testing.assert_close(y[:1], ya, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y[1:, 4:], yb, rtol=1e-10, atol=1e-10)
    for key in s:
        torch.testing.assert_close(s[key][1:], sb[key], rtol=1e-10, atol=1e-10)


def test_token_changes_only_its_memories_and_the_shared_one():
    m = make()
    x = torch.randn(3, 9, D, dtype=torch.float64)
    _, before = m.scan(x[:, :8], return_state=True)
    _, top_i, _ = m._route(x[:, 8])
    chosen = torch.zeros(3, m.n_slots, dtype=torch.bool)
    chosen[torch.arange(3)[:, None], top_i] = True
    chosen[:, m.n_memories] = True  # the shared memory sees every token
    _, stepped = m.step(x[:, 8], before)
    _, scanned = m.scan(x, return_state=True)
    for key in ("memory", "conv_kv"):
        changed = (stepped[key] != before[key]).flatten(2).any(-1)
        assert torch.equal(changed, chosen), key
        # The full scan agrees: memories the last token did not pick end where the prefix left them.
        torch.testing.assert_close(scanned[key][~chosen], before[key][~chosen], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(scanned[key][chosen], before[key][chosen])


def test_aux_loss_is_positive_and_trains_the_router():
    m = make().train()
    x = torch.randn(2, 12, D, dtype=torch.float64)
    m(x)
    assert m.aux_loss is not None and m.aux_loss.item() > 0
    # Switch loss: scale * M * sum_m f_m P_m, f = fraction of routed slots, P = mean router probability.
    probs = F.linear(x.reshape(-1, D), m.router.weight).softmax(-1)
    frac = F.one_hot(probs.topk(2).indices, 4).sum(1).double().mean(0) / 2
    torch.testing.assert_close(m.aux_loss, 0.01 * 4 * (frac * probs.mean(0)).sum())
    m.aux_loss.backward()
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
    m.eval()
    m(torch.randn(1, 3, D, dtype=torch.float64))
    assert m.aux_loss is None


def test_unlimited_capacity_routes_every_token_even_when_all_pick_the_same_memories():
    m = make(n_memories=4, top_k=2)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0], m.router.weight[1, 0] = 0.5, 0.3  # memories 0 and 1 win for every token
    x = torch.randn(1, 20, D, dtype=torch.float64)
    x[..., 0] = 20.0
    y, s = m.scan(x, return_state=True)
    # No token dropped: the output equals a dense pass of all tokens through memories 0, 1 and the shared one.
    probs = F.linear(x[0], m.router.weight).softmax(-1)[:, :2]
    weights = probs / probs.sum(-1, keepdim=True)
    q = F.silu(F.conv1d(F.pad(m.q_proj(x[0]).T, (3, 0)), m.q_conv.weight[:, None], m.q_conv.bias, groups=32)).T
    q = F.normalize(q.unflatten(-1, (2, 16)), dim=-1)
    mix = 0
    for slot, w in ((0, weights[:, 0]), (1, weights[:, 1]), (4, torch.ones(20, dtype=x.dtype))):
        kv = F.linear(x[0], m.kv_weight[slot]).T
        kv = F.silu(F.conv1d(F.pad(kv, (3, 0)), m.kv_conv_weight[slot][:, None], m.kv_conv_bias[slot], groups=64)).T
        k, v, beta, g = m._memory_inputs(kv, F.linear(x[0], m.gate_weight[slot]), torch.tensor(slot))
        o, _ = delta_rule_reference(q[None], k[None], v[None], beta[None], g[None])
        mix = mix + o[0] * w[:, None, None]
    torch.testing.assert_close(y[0], m._output(x[0], mix), rtol=1e-10, atol=1e-10)
    assert torch.all(s["memory"][:, 2:4] == 0) and torch.all(s["memory"][:, :2] != 0)


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_triton_backend_matches_torch_backend():
    x = torch.randn(1, 10, D, dtype=torch.float64)
    y_torch = make(chunk_size=16).scan(x)[0]
    y_triton = make(chunk_size=16, backend="triton").scan(x)[0]
    torch.testing.assert_close(y_triton, y_torch, rtol=1e-10, atol=1e-10)


def test_bf16_long_sequence_is_finite():
    torch.manual_seed(0)
    m = MoM(D, n_heads=2, head_dim=16).to(torch.bfloat16).train()
    x = torch.randn(1, 16384, D, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    (y.float().square().mean() + m.aux_loss).backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_state_size_counts_all_memories_shared_and_conv_states():
    m = make()
    state = m.init_state(1)
    assert m.state_size() == sum(t[0].numel() for t in state.values())
    assert m.state_size() == 5 * (2 * 16 * 16 + 64 * 3) + 32 * 3


def test_bad_configuration_raises_clear_errors():
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and n_memories=4"):
        MoM(D, top_k=5)
    with pytest.raises(ValueError, match="n_heads=3 must divide d_model=32"):
        MoM(D, n_heads=3)
    with pytest.raises(ValueError, match="memory must be one of"):
        MoM(D, memory="lstm")
    m = make()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="carried state holds 1 sequences"):
        m.scan(x, state=m.init_state(1, dtype=x.dtype))
    with pytest.raises(ValueError, match="flatten the batch to B=1"):
        m.scan(x, cu_seqlens=torch.tensor([0, 5]))


def test_yaml_config_builds_a_mom_model():
    cfg = zoo.load_config("configs/mom.yaml")
    model = zoo.build_model(cfg.model if hasattr(cfg, "model") else cfg)
    assert any(isinstance(mod, MoM) for mod in model.modules())
