"""bf16 accuracy of every registered mixer: a bf16 copy of a model against the fp32 model, and bf16 decode.

Relative L2 of the logits at L=2048 (d_model 64, 2 layers). Measured (CPU, these seeds): fp32 -> bf16 weights
0.6-1.7% for every mixer (s4 0.7%, mom 1.9% with the routing pinned); bf16 decode vs bf16 forward over 128
tokens <= 1.3% (retnet), mom 0.2%. Before the fix s4 was 4.5% (its SSM parameters were rounded to bf16) and
mom's decode 6.9% (the step path rounded differently from the scan).

MoM's router picks the top-k memories, a discontinuous choice: under bf16 the residual stream moves by ~1% and
about 0.4% of the tokens at layer 2 pick another memory, which moves the output by ~7% -- the fp32 model itself
moves 14% under a 1.3% random perturbation of its input (no bf16 involved). So the fp32/bf16 comparison pins MoM's routing to the fp32
model's choices (the weights are still computed from each model's own router) and checks everything else.
"""

import copy

import pytest
import torch

import zoo
from zoo.config import mixer_schema
from zoo.mixers.mom import MoM
from zoo.models import ZooConfig, ZooForCausalLM
from zoo.train.loop import autocast_for

V, D, L, L_DECODE = 97, 64, 2048, 128
TOL = 0.02  # one tolerance for every mixer, both checks
SMALL = {
    "attention": {"n_heads": 4},
    "mamba": {"d_state": 8},
    "mamba2": {"d_state": 16, "headdim": 16, "chunk_size": 64},
    "hydra": {"d_state": 16, "headdim": 16},
    "s4": {"d_state": 16},
    "mom": {"n_heads": 2, "head_dim": 32},
    "retnet": {"n_heads": 2},
}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make(name, n_layers=2):
    schema = mixer_schema(zoo.get_mixer(name))
    kw = {k: v for k, v in SMALL.get(name, {}).items() if k in schema}
    cfg = ZooConfig(vocab_size=V, d_model=D, n_layers=n_layers, pattern=[name], mixers={name: kw}, mlp="swiglu")
    torch.manual_seed(0)
    return ZooForCausalLM(cfg).eval()


@pytest.fixture
def pinned_routing(monkeypatch):
    """MoM's routing: record the choices of the first model run (``record``), reuse them afterwards (``replay``)."""
    choices, mode = {}, {"now": "record"}
    route = MoM._route

    def pinned(self, x):
        probs, top_i, top_w = route(self, x)
        key = (self.layer_idx, x.shape[0])
        if mode["now"] == "record":
            choices[key] = top_i
        else:
            top_i = choices[key]
            top_w = probs.gather(-1, top_i)
            top_w = top_w / top_w.sum(-1, keepdim=True)
        return probs, top_i, top_w

    monkeypatch.setattr(MoM, "_route", pinned)
    return mode


@pytest.mark.parametrize("name", zoo.list_mixers())
def test_bf16_weights_match_fp32(name, pinned_routing):
    m32 = make(name)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    x = torch.randint(0, V, (1, L))
    with torch.no_grad():
        ref = m32(x).logits
        pinned_routing["now"] = "replay"
        err = rel(m16(x).logits, ref)
    assert err < TOL, f"{name}: bf16 weights vs fp32 relative L2 {err:.4f} at L={L}"


@pytest.mark.parametrize("name", ["s4", "mom"])
def test_bf16_autocast_matches_fp32(name, pinned_routing):
    # The training loop's bf16 precision: fp32 weights under autocast.
    model = make(name)
    x = torch.randint(0, V, (1, L))
    with torch.no_grad():
        ref = model(x).logits
        pinned_routing["now"] = "replay"
        with autocast_for(torch.device("cpu"), "bf16"):
            err = rel(model(x).logits, ref)
    assert err < TOL, f"{name}: bf16 autocast vs fp32 relative L2 {err:.4f}"


@pytest.mark.parametrize("name", [n for n in zoo.list_mixers() if zoo.get_mixer(n).has_step])
def test_bf16_decode_matches_bf16_forward(name):
    model = make(name).to(torch.bfloat16)
    x = torch.randint(0, V, (1, L_DECODE))
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache()
        steps = [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(L_DECODE)]
    err = rel(torch.cat(steps, 1), full)
    assert err < TOL, f"{name}: bf16 decode vs bf16 forward relative L2 {err:.4f} over {L_DECODE} tokens"


def _declared(model):
    names = model.fp32_parameters()
    assert any(".mixer." in n for n in names), "the mixer declares no keep_in_fp32 parameters"
    return names


@pytest.mark.parametrize("name", ["s4", "mom"])
def test_keep_in_fp32_survives_to_from_pretrained_and_default_dtype(name, tmp_path):
    m32 = make(name, n_layers=1)
    ref = {n: p.detach().clone() for n, p in _declared(m32).items()}
    assert {n.split(".mixer.", 1)[1] for n in ref} >= set(
        {"s4": ("log_dt", "log_A_real", "A_imag", "B", "C"), "mom": ("A_log", "dt_bias", "router.weight")}[name]
    )

    def check(model, how):
        params = dict(model.named_parameters())
        for n, want in ref.items():
            assert params[n].dtype == torch.float32, f"{how}: {n} is {params[n].dtype}"
            assert torch.equal(params[n], want), f"{how}: {n} was rounded"
        assert params["model.layers.0.mixer_norm.weight"].dtype != torch.float32, f"{how}: the rest was not cast"

    check(copy.deepcopy(m32).to(torch.bfloat16), "model.to(bfloat16)")
    check(copy.deepcopy(m32).half(), "model.half()")
    m32.save_pretrained(tmp_path)
    check(ZooForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16), "from_pretrained(dtype=bfloat16)")
    # Built under a bf16 default dtype (as some loaders do): the declared parameters are float32.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        fresh = ZooForCausalLM(m32.config)
    finally:
        torch.set_default_dtype(old)
    assert all(p.dtype == torch.float32 for p in _declared(fresh).values())
    # A bf16 model with fp32 SSM parameters runs, saves and reloads with them.
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    with torch.no_grad():
        out = m16(torch.randint(0, V, (1, 16))).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    m16.save_pretrained(tmp_path / "bf16")
    check(ZooForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16), "bf16 checkpoint reloaded")
