"""`model.backend` (and `model.mixers.<name>.backend`) is a setting that reaches every kernel call."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import small_hybrid_config, small_kwargs

import zoo
from zoo.models import ZooConfig, ZooForCausalLM

KERNEL_MODULES = ["zoo.kernels.scan", "zoo.kernels.selective", "zoo.kernels.conv", "zoo.kernels.gla",
                  "zoo.kernels.delta_rule", "zoo.kernels.ssd_scan"]


@pytest.fixture
def calls(monkeypatch):
    """Every (kernel, backend argument) that reaches a kernel's backend resolution."""
    seen = []
    for name in KERNEL_MODULES:
        module = sys.modules[name]
        real = module.resolve_backend

        def spy(backend, *tensors, op, real=real, **kw):
            seen.append((op, backend))
            return real(backend, *tensors, op=op, **kw)

        monkeypatch.setattr(module, "resolve_backend", spy)
    return seen


def _model(name, mixer_kw=None, **model_kw):
    cfg = ZooConfig(vocab_size=41, d_model=32, n_layers=1, pattern=[name], mixers={name: small_kwargs(name, **(mixer_kw or {}))},
                    tie_word_embeddings=False, **model_kw)
    torch.manual_seed(0)
    return ZooForCausalLM(cfg).eval()


def _run(model, decode=True):
    x = torch.randint(0, 41, (1, 12))
    with torch.no_grad():
        out = model(x).logits
        if decode and all(b.mixer.causal and b.mixer.has_step for b in model.model.layers):
            cache = model.new_cache()
            model(x[:, :8], past_key_values=cache, use_cache=True)
            model(x[:, 8:9], past_key_values=cache, use_cache=True)
    return out


USES_KERNELS = [n for n in zoo.list_mixers() if n not in ("attention", "s4")]  # s4: fft_conv (torch.fft only)


@pytest.mark.parametrize("name", USES_KERNELS)
def test_model_backend_reaches_every_kernel_call(name, calls):
    _run(_model(name, backend="torch"))
    assert calls and {b for _, b in calls} == {"torch"}, calls
    calls.clear()
    _run(_model(name))  # auto: every kernel chooses
    assert calls and {b for _, b in calls} == {None}, calls


def test_per_mixer_backend_overrides_the_model_setting(calls):
    cfg = small_hybrid_config("samba", vocab=41, d_model=32, overrides=["model.backend=torch",
                                                                         "model.mixers.mamba.backend=auto"])
    torch.manual_seed(0)
    model = ZooForCausalLM(cfg).eval()
    kinds = {b.mixer.mixer_name: b.mixer.backend for b in model.model.layers}
    assert kinds == {"mamba": None, "attention": "torch"}
    _run(model)
    assert calls and {b for _, b in calls} == {None}


@pytest.mark.parametrize("name", ["mamba", "mamba2", "retnet", "hgrn", "mom"])
def test_triton_backend_equals_torch_backend(name):
    kw = {"chunk_size": 16}  # the Triton chunked kernels take powers of two >= 16
    torch_out = _run(_model(name, kw, backend="torch"), decode=False)
    triton_out = _run(_model(name, kw, backend="triton"), decode=False)  # the Triton interpreter on CPU
    torch.testing.assert_close(triton_out, torch_out, rtol=1e-4, atol=1e-4)


def test_bad_backend_settings_are_one_sentence():
    with pytest.raises(zoo.ConfigError, match=r"model.backend.*auto.*torch.*triton.*cuda"):
        zoo.load_config({"model": {"d_model": 32, "backend": "tpu", "pattern": ["mamba"]}})
    with pytest.raises(zoo.ConfigError, match=r"model.mixers.mamba.backend"):
        zoo.load_config({"model": {"d_model": 32, "pattern": ["mamba"], "mixers": {"mamba": {"backend": "fast"}}}})
    run = zoo.load_config({"model": {"d_model": 32, "n_layers": 1, "pattern": ["mamba"],
                                     "mixers": {"mamba": {"backend": "cuda"}}}})
    model = zoo.build_model(run).eval()
    assert model.model.layers[0].mixer.backend == "cuda"
    with pytest.raises(RuntimeError, match=r"backend 'cuda' needs the optional package .*seq-zoo\[cuda\]"):
        model(torch.randint(0, 10, (1, 4)))
