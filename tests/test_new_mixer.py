"""Adding an architecture is its file, its YAML and its tests: a mixer registered at runtime (here, in this test)
is picked up by the shared property checks, the docs generator and `zoo list` with no other edit."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_decode_matches_forward, assert_packed_equals_separate, small_kwargs
from torch import nn

import zoo
from zoo import registry
from zoo.kernels import linear_scan
from zoo.kernels.scan import pad_identity
from zoo.mixers.base import RecurrentMixer, State
from zoo.models import ZooConfig, ZooForCausalLM

NAME = "example-ema"
ROOT = Path(__file__).resolve().parents[1]


class ExampleEMA(RecurrentMixer):
    """Example: a per-channel exponential moving average, ``h_t = a h_{t-1} + (1 - a) W x_t``, then ``O h_t``."""

    paper = ("An example mixer for the contributing guide", "seq-zoo 2026", "0000.00000")
    state_formula = "expand · D (one average per channel)"
    test_settings = {"expand": 2}

    def __init__(self, d_model: int, *, layer_idx: int = 0, expand: int = 1) -> None:
        super().__init__(d_model, layer_idx=layer_idx)
        self.d_inner = expand * d_model
        self.in_proj = nn.Linear(d_model, self.d_inner, bias=False)
        self.decay_logit = nn.Parameter(torch.linspace(-2.0, 2.0, self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _coeffs(self, x):
        a = torch.sigmoid(self.decay_logit).expand(*x.shape[:-1], self.d_inner)
        return a, (1 - a) * self.in_proj(x)

    def scan(self, x, *, state: State | None = None, mask=None, cu_seqlens=None, return_state=False):
        a, b = pad_identity(*self._coeffs(x), mask)
        h, last = linear_scan(a, b, None if state is None else state["h"], cu_seqlens=cu_seqlens)
        return self.out_proj(h), ({"h": last} if return_state else None)

    def step(self, x, state):
        a, b = self._coeffs(x)
        h = a * state["h"] + b
        return self.out_proj(h), {"h": h}

    def init_state(self, batch_size, *, device=None, dtype=None):
        return {"h": torch.zeros(batch_size, self.d_inner, device=device, dtype=dtype or torch.float32)}

    def state_size(self, seq_len=None):
        return self.d_inner


@pytest.fixture
def example():
    zoo.list_mixers()  # the built-in mixers first
    registry.register_mixer(NAME)(ExampleEMA)
    yield NAME
    registry._MIXERS.pop(NAME, None)


def _model(name):
    cfg = ZooConfig(vocab_size=53, d_model=32, n_layers=2, pattern=[name], mixers={name: small_kwargs(name)},
                    tie_word_embeddings=False)
    torch.manual_seed(0)
    return ZooForCausalLM(cfg).eval()


def test_shared_property_checks_cover_a_new_mixer(example):
    assert small_kwargs(example) == {"expand": 2}  # its own test settings, read from the class
    model = _model(example)
    assert model.model.layers[0].mixer.d_inner == 64
    assert_decode_matches_forward(model, torch.randint(0, 53, (2, 11)), prefill=4)
    assert_packed_equals_separate(model, [torch.randint(1, 53, (1, 7)), torch.randint(1, 53, (1, 5))])
    # The checks can fail: a mixer whose step forgets the state disagrees with its forward.
    model.model.layers[0].mixer.step = lambda x, state: ExampleEMA.step(model.model.layers[0].mixer, x,
                                                                        {"h": torch.zeros_like(state["h"])})
    with pytest.raises(AssertionError):
        assert_decode_matches_forward(model, torch.randint(0, 53, (2, 11)), prefill=4)


def test_docs_generator_and_zoo_list_pick_up_a_new_mixer(example, capsys):
    spec = importlib.util.spec_from_file_location("gen_arch_docs", ROOT / "scripts" / "gen_arch_docs.py")
    gen = importlib.util.module_from_spec(spec)
    sys.modules["gen_arch_docs"] = gen
    try:
        spec.loader.exec_module(gen)
        page, info = gen.describe(example, gen.kernel_backends(), "")
    finally:
        sys.modules.pop("gen_arch_docs", None)
    assert "An example mixer for the contributing guide" in page and "expand · D (one average per channel)" in page
    assert info["decode"] and info["packing"] and info["kernels"] == ["linear_scan"]
    from zoo.cli import main

    assert main(["list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(example))
    assert "exponential moving average" in line
