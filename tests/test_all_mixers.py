"""Properties every registered mixer keeps inside the one model family (a new mixer is covered unchanged)."""

import pytest
import torch
from conftest import (
    assert_decode_matches_forward,
    assert_left_padded_batch_equals_separate,
    assert_packed_equals_separate,
    small_kwargs,
)
from transformers import AutoModelForCausalLM

import zoo
from zoo.models import ZooConfig, ZooForCausalLM

V, D = 61, 32


def causal_mixers():
    return [n for n in zoo.list_mixers() if getattr(zoo.get_mixer(n), "causal", True) and zoo.get_mixer(n).has_step]


def bidirectional_mixers():
    return [n for n in zoo.list_mixers() if n not in causal_mixers()]


def make(name, *, n_layers=2, seed=0, **extra):
    cfg = ZooConfig(vocab_size=V, d_model=D, n_layers=n_layers, pattern=[name],
                    mixers={name: small_kwargs(name, **extra)}, mlp="swiglu")
    torch.manual_seed(seed)
    return ZooForCausalLM(cfg).eval()


@pytest.mark.parametrize("name", zoo.list_mixers())
def test_mixer_is_documented_and_reports_state_size(name):
    cls = zoo.get_mixer(name)
    assert cls.__doc__, f"{name} needs a docstring"
    mixer = cls(D, **small_kwargs(name))
    size = mixer.state_size(16)
    assert isinstance(size, int) and size > 0


@pytest.mark.parametrize("name", causal_mixers())
def test_save_load_round_trip_gives_identical_logits(name, tmp_path):
    model = make(name)
    x = torch.randint(0, V, (2, 9))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, loaded(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", causal_mixers())
def test_decode_after_prefill_matches_full_forward(name):
    assert_decode_matches_forward(make(name), torch.randint(0, V, (2, 13)), prefill=6)


@pytest.mark.parametrize("name", causal_mixers())
def test_generate_with_cache_equals_without_and_chunked_prefill(name):
    model = make(name)
    x = torch.randint(1, V, (2, 7))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = model.generate(x, use_cache=True, **kw)
        b = model.generate(x, use_cache=False, **kw)
        c = model.generate(x, use_cache=True, prefill_chunk_size=3, **kw)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("name", causal_mixers())
def test_left_padded_batch_equals_separate_sequences(name):
    assert_left_padded_batch_equals_separate(make(name), (8, 5), V)


@pytest.mark.parametrize("name", causal_mixers())
def test_packed_equals_separate_sequences(name):
    assert_packed_equals_separate(make(name), [torch.randint(1, V, (1, 9)), torch.randint(1, V, (1, 6))])


@pytest.mark.parametrize("name", causal_mixers())
def test_training_step_reduces_loss(name):
    model = make(name).train()
    x = torch.randint(0, V, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("name", bidirectional_mixers())
def test_bidirectional_mixer_classifies_and_refuses_decoding(name):
    cfg = ZooConfig(vocab_size=V, d_model=D, n_layers=2, pattern=[name], mixers={name: small_kwargs(name)}, num_labels=2)
    model = zoo.build_model(cfg, head="classification").eval()
    x = torch.randint(0, V, (2, 10))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % V
    with torch.no_grad():
        first = model(x).logits
        # Bidirectional: changing the last token changes the pooled output through every position.
        assert not torch.allclose(first, model(y).logits)
    mixer = model.model.layers[0].mixer
    with pytest.raises(RuntimeError):
        mixer.step(torch.randn(2, D), {})
