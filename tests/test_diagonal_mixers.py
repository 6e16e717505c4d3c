"""minGRU, minLSTM, HGRN and GateLoop: parallel == step, decode == full forward, packing and padding == separate."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from zoo.mixers.hgrn import HGRN, HGRNLowerBound
from zoo.models.cache import RecurrentStateLayer, ZooCache
from zoo.registry import get_mixer, list_mixers

D = 8
LAYER = 1  # built as the second layer so HGRN gets a non-zero lower bound from its shared module
CASES = [
    ("mingru", {}),
    ("mingru", {"expand": 2.0}),
    ("minlstm", {}),
    ("hgrn", {}),
    ("hgrn", {"variant": "real"}),
    ("gateloop", {}),
    ("gateloop", {"head_dim": 4}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw in CASES]


def build(name: str, kw: dict, dtype=torch.float64, d: int = D):
    torch.manual_seed(0)
    mixer = get_mixer(name)(d, layer_idx=LAYER, **kw)
    shared = type(mixer).build_shared(d_model=d, layer_indices=[0, LAYER], n_layers=2, kwargs=[kw, kw])
    if shared is not None:
        with torch.no_grad():
            for p in shared.parameters():
                p.normal_()
        shared.to(dtype)
        mixer.bind_shared(shared)
    return mixer.to(dtype)


def rel_err(x, ref):
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def steps(mixer, x, state):
    ys = []
    for t in range(x.shape[1]):
        y, state = mixer.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def same_state(s1, s2, tol=1e-10):
    assert s1.keys() == s2.keys()
    for k in s1:
        assert rel_err(s1[k], s2[k]) < tol, k


def test_registered():
    assert {"mingru", "minlstm", "hgrn", "gateloop"} <= set(list_mixers())


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_scan_equals_step_by_step(name, kw):
    m = build(name, kw)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    y, state = m.scan(x, return_state=True)
    y_step, state_step = steps(m, x, m.init_state(2, dtype=torch.float64))
    assert y.shape == x.shape
    assert rel_err(y, y_step) < 1e-10
    same_state(state, state_step)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_scan_with_carried_state_equals_one_scan(name, kw):
    m = build(name, kw)
    x = torch.randn(2, 12, D, dtype=torch.float64)
    y_full, s_full = m.scan(x, return_state=True)
    _, s5 = m.scan(x[:, :5], return_state=True)
    y_rest, s_rest = m.scan(x[:, 5:], state=s5, return_state=True)
    assert rel_err(y_rest, y_full[:, 5:]) < 1e-10
    same_state(s_rest, s_full)
    y_step, _ = steps(m, x[:, 5:], s5)  # the sequential form from the same carried-in state
    assert rel_err(y_step, y_full[:, 5:]) < 1e-10


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_decode_after_prefill_matches_full_forward(name, kw):
    m = build(name, kw)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    full = m(x)
    cache = ZooCache([RecurrentStateLayer(), RecurrentStateLayer()])
    outs = [m(x[:, :6], cache=cache)]
    outs += [m(x[:, t : t + 1], cache=cache) for t in range(6, 10)]
    assert rel_err(torch.cat(outs, dim=1), full) < 1e-10
    assert cache.get_seq_length(LAYER) == 10


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_packed_equals_separate(name, kw):
    m = build(name, kw)
    lens = [3, 6, 1, 4]
    seqs = [torch.randn(1, n, D, dtype=torch.float64) for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    y, state = m.scan(torch.cat(seqs, dim=1), cu_seqlens=cu, return_state=True)
    sep = [m.scan(s, return_state=True) for s in seqs]
    assert rel_err(y, torch.cat([o for o, _ in sep], dim=1)) < 1e-10
    for k in state:  # final states come back one row per sequence
        assert rel_err(state[k], torch.cat([s[k] for _, s in sep], dim=0)) < 1e-10
    assert rel_err(m(torch.cat(seqs, dim=1), cu_seqlens=cu), y) < 1e-12


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_left_padded_equals_separate(name, kw):
    m = build(name, kw)
    long, short = torch.randn(1, 7, D, dtype=torch.float64), torch.randn(1, 4, D, dtype=torch.float64)
    junk = torch.randn(1, 3, D, dtype=torch.float64)  # padding content must not matter
    x = torch.cat([long, torch.cat([junk, short], dim=1)], dim=0)
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    nxt = torch.randn(2, 1, D, dtype=torch.float64)
    cache = ZooCache([RecurrentStateLayer(), RecurrentStateLayer()])
    y = m(x, cache=cache, attention_mask=mask)
    y_next = m(nxt, cache=cache, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1))
    for i, seq in enumerate([long, short]):
        ref = m(torch.cat([seq, nxt[i : i + 1]], dim=1))
        n = seq.shape[1]
        assert rel_err(y[i : i + 1, 7 - n :], ref[:, :n]) < 1e-10
        assert rel_err(y_next[i : i + 1], ref[:, n:]) < 1e-10


class _ScanWithState(torch.nn.Module):
    """``(x, *state) -> (y, *new_state)`` through the parallel path, for gradcheck over inputs, state and weights."""

    def __init__(self, mixer):
        super().__init__()
        self.mixer = mixer

    def forward(self, x, *state):
        keys = list(self.mixer.init_state(1))
        y, new = self.mixer.scan(x, state=dict(zip(keys, state)), return_state=True)
        return y, *new.values()


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_gradcheck_float64(name, kw):
    wrapped = _ScanWithState(build(name, kw, d=4))
    names = [n for n, _ in wrapped.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in wrapped.parameters()]
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    state = [torch.randn_like(v).requires_grad_() for v in wrapped.mixer.init_state(1, dtype=torch.float64).values()]
    n_state = len(state)

    def fn(x, *rest):
        return functional_call(wrapped, dict(zip(names, rest[n_state:])), (x, *rest[:n_state]))

    assert torch.autograd.gradcheck(fn, (x, *state, *params), atol=1e-6)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_float32_matches_float64_and_bf16_is_finite(name, kw):
    m64 = build(name, kw)
    x = torch.randn(2, 33, D, dtype=torch.float64)
    y64 = m64.scan(x)[0]
    m32 = build(name, kw, dtype=torch.float32)
    assert rel_err(m32.scan(x.float())[0].double(), y64) < 1e-4
    mb = build(name, kw, dtype=torch.bfloat16)
    yb = mb.scan(x.bfloat16())[0]
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb.float()).all()


def test_state_sizes():
    assert get_mixer("mingru")(D).state_size() == D
    assert get_mixer("minlstm")(D, expand=2.0).state_size() == 2 * D
    assert HGRN(D).state_size() == 2 * D and HGRN(D, variant="real").state_size() == D
    assert get_mixer("gateloop")(D).state_size() == 2 * D
    assert get_mixer("gateloop")(D, head_dim=4).state_size() == 2 * (D // 4) * 16


def test_hgrn_lower_bounds_monotone_in_layer_and_zero_at_first_layer():
    shared = HGRN.build_shared(d_model=D, layer_indices=[0, 2, 3, 5], n_layers=6, kwargs=[{}] * 4)
    assert isinstance(shared, HGRNLowerBound)
    with torch.no_grad():
        shared.gamma.normal_(0, 2)
    lb = shared.bounds()
    assert lb.shape == (4, D)
    assert torch.all(lb[0] == 0)
    assert torch.all(lb[1:] - lb[:-1] >= 0) and torch.all(lb < 1)
    layers = [HGRN(D, layer_idx=i) for i in (0, 2, 3, 5)]
    for k, layer in enumerate(layers):
        layer.bind_shared(shared)
        assert torch.equal(layer.lower_bound(), lb[k])
    layers[2](torch.randn(1, 4, D)).sum().backward()  # the shared parameter learns through every layer
    assert shared.gamma.grad is not None and shared.gamma.grad.abs().sum() > 0
    assert HGRN(D).lower_bound() == 0.0  # standalone: no shared module bound
    with pytest.raises(KeyError, match="not an HGRN layer"):
        shared(1)


@pytest.mark.parametrize(
    "name,kw,match",
    [
        ("gateloop", {"head_dim": 3}, "divide d_model"),
        ("hgrn", {"variant": "quaternion"}, "variant must be one of"),
        ("mingru", {"expand": 0.0}, "expand > 0"),
        ("minlstm", {"expand": -1.0}, "expand > 0"),
    ],
)
def test_bad_config_raises_one_clear_error(name, kw, match):
    with pytest.raises(ValueError, match=match):
        get_mixer(name)(D, **kw)


@pytest.mark.parametrize("name", ["mingru", "minlstm", "hgrn", "gateloop"])
def test_model_generate_matches_greedy_full_forward(name):
    from zoo import build_model

    torch.manual_seed(0)
    model = build_model({"model": {"vocab_size": 64, "d_model": 16, "n_layers": 2, "pattern": [name], "mlp": "none"}}).eval()
    ids = torch.randint(0, 64, (2, 7))
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    seq = ids
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    if name == "hgrn":  # the model owns one lower-bound parameter and binds it to both layers
        bounds = [layer.mixer.lower_bound() for layer in model.model.layers]
        assert torch.all(bounds[0] == 0) and torch.all(bounds[1] > 0)
