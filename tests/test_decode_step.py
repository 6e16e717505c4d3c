"""The fused decode steps equal the kernels' reference one-step updates, and cheap input checks still refuse bad ids."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.kernels import causal_conv1d_update, selective_state_update
from zoo.models.validation import HOST_CHECK_MAX, check_inputs
from zoo.registry import build_mixer


def _state(mixer, batch: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in mixer.init_state(batch, dtype=torch.float64).items()}


@torch.no_grad()
def test_mamba_step_equals_the_kernel_updates():
    m = build_mixer("mamba", 16, kwargs={"d_state": 8}).double()
    x, state = torch.randn(3, 16, dtype=torch.float64), _state(m, 3)
    y, new = m.step(x, state)
    xs, z = m.in_proj(x).chunk(2, dim=-1)
    xc, conv = causal_conv1d_update(xs, state["conv"], m.conv1d.weight[:, 0], m.conv1d.bias, "silu")
    dt, B, C = m.x_proj(xc).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    ref, ssm = selective_state_update(state["ssm"], xc, F.linear(dt, m.dt_proj.weight), -torch.exp(m.A_log), B, C,
                                      m.D, z, m.dt_proj.bias, dt_softplus=True)
    torch.testing.assert_close(y, m.out_proj(ref), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new["conv"], conv, rtol=0, atol=0)
    torch.testing.assert_close(new["ssm"], ssm, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ngroups", [1, 2])
@torch.no_grad()
def test_mamba2_step_equals_the_recurrence_with_repeated_groups(ngroups):
    m = build_mixer("mamba2", 16, kwargs={"d_state": 8, "headdim": 8, "ngroups": ngroups}).double()
    x, state = torch.randn(3, 16, dtype=torch.float64), _state(m, 3)
    y, new = m.step(x, state)
    z, xBC, dt = m._split(m.in_proj(x))
    xc, conv = causal_conv1d_update(xBC, state["conv"], m.conv1d.weight[:, 0], m.conv1d.bias, "silu")
    dt = m._dt(dt)
    xs, B, C = xc.split([m.d_inner, ngroups * m.d_state, ngroups * m.d_state], dim=-1)
    xs = xs.view(3, m.nheads, m.headdim)
    rep = m.nheads // ngroups
    B = B.view(3, ngroups, m.d_state).repeat_interleave(rep, dim=1)  # (B, H, N): head h uses group h // rep
    C = C.view(3, ngroups, m.d_state).repeat_interleave(rep, dim=1)
    h = state["ssm"] * torch.exp(dt * -torch.exp(m.A_log))[..., None, None] + (dt[..., None] * xs)[..., None] * B[:, :, None]
    ref = (h @ C[..., None])[..., 0] + m.D[:, None] * xs
    torch.testing.assert_close(y, m.out_proj(m.norm(ref.reshape(3, m.d_inner), z)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new["conv"], conv, rtol=0, atol=0)
    torch.testing.assert_close(new["ssm"], h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, HOST_CHECK_MAX, HOST_CHECK_MAX + 1, 4 * HOST_CHECK_MAX])
@pytest.mark.parametrize("bad", [-1, 50])
def test_ids_outside_the_vocabulary_are_refused_on_both_check_paths(n, bad):
    ids = torch.zeros(1, n, dtype=torch.long)
    check_inputs(ids, None, 50)
    ids[0, n // 2] = bad
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 50\)"):
        check_inputs(ids, None, 50)


# ----- compile_decode ---------------------------------------------------------------------------------------
def _lm(pattern):
    import zoo

    torch.manual_seed(0)
    mixers = {"attention": {"n_heads": 4}} if "attention" in pattern else {}
    return zoo.build_model({"model": {"vocab_size": 97, "d_model": 48, "n_layers": 2, "pattern": pattern,
                                      "mlp": "none", "tie_word_embeddings": False, "mixers": mixers}}).eval()


@torch.no_grad()
def _decode_logits(model, prompt, n):
    out = model(input_ids=prompt, use_cache=True)
    cache, tok, logits = out.cache, out.logits[:, -1:].argmax(-1), []
    for _ in range(n):
        out = model(input_ids=tok, cache=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        tok = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits, 1)


@pytest.mark.parametrize("pattern", [["mamba"], ["mamba", "attention"]], ids=["mamba", "mamba+attention"])
def test_compiled_decode_equals_eager_and_sees_new_weights(pattern):
    """compile_decode(): the compiled steps give the eager steps' logits (a recurrent state, and a KV cache that
    grows every step), they really run, and a weight changed in place after compiling is used by the next step
    (the frozen graph is recompiled), not the stale constant."""
    model = _lm(pattern)
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    eager = _decode_logits(model, prompt, 6)
    model.compile_decode()
    calls = []
    step = model.__dict__["_decode_compiled"]
    model.__dict__["_decode_compiled"] = lambda **kw: calls.append(1) or step(**kw)
    torch.testing.assert_close(_decode_logits(model, prompt, 6), eager, rtol=1e-5, atol=1e-5)
    assert len(calls) == 6
    with torch.no_grad():
        model.lm_head.weight.mul_(-0.5)  # in place: the version counter moves
    compiled = _decode_logits(model, prompt, 3)
    model.compile_decode(False)
    torch.testing.assert_close(compiled, _decode_logits(model, prompt, 3), rtol=1e-5, atol=1e-5)
    with torch.enable_grad():  # training-like calls never take the compiled step
        model.compile_decode()
        assert model._compiled_step(prompt[:, :1], model.new_cache(), None, None, None, None, True,
                                    (None,) * 6, None) is None
