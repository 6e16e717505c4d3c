"""Hybrid stacks: configs, the hybrid cache, chunked prefill, MoE routing, passkey retrieval."""

import pytest
import torch
from conftest import (
    assert_chunked_prefill_matches_forward,
    assert_decode_matches_forward,
    small_hybrid_config,
)

import zoo
from zoo.config import validate_model
from zoo.data.passkey import evaluate_passkey, make_passkey_example
from zoo.data.tokenizer import ByteTokenizer
from zoo.models import GENERATION_CACHE_KEY, ZooConfig, ZooForCausalLM
from zoo.nn.moe import MoE

HYBRIDS = ["samba", "jamba", "mom-attention", "hgrn-swa"]
V = 67


def small_hybrid(name, seed=0):
    cfg = small_hybrid_config(name, vocab=V, d_model=32)
    torch.manual_seed(seed)
    return ZooForCausalLM(cfg).eval()


@pytest.mark.parametrize("name", HYBRIDS)
def test_hybrid_decode_after_prefill_matches_full_forward(name):
    assert_decode_matches_forward(small_hybrid(name), torch.randint(0, V, (2, 12)), prefill=5)


@pytest.mark.parametrize("name", HYBRIDS)
def test_hybrid_chunked_prefill_equals_one_shot(name):
    model = small_hybrid(name)
    x = torch.randint(0, V, (1, 23))
    assert_chunked_prefill_matches_forward(model, x, [(0, 9), (9, 16), (16, 23)])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(x, **kw), model.generate(x, prefill_chunk_size=4, **kw))


@pytest.mark.parametrize("name", ["samba", "jamba"])
def test_hybrid_greedy_sampling_and_beam_search_run(name):
    model = small_hybrid(name)
    x = torch.randint(1, V, (2, 6))
    with torch.no_grad():
        greedy = model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0)
        no_cache = model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False)
        sampled = model.generate(x, max_new_tokens=5, do_sample=True, top_p=0.9, pad_token_id=0)
        beams = model.generate(x, max_new_tokens=5, num_beams=3, num_return_sequences=2, pad_token_id=0)
    assert torch.equal(greedy, no_cache)
    assert sampled.shape == (2, 11) and beams.shape == (4, 11)


def test_sliding_window_cache_stays_bounded_over_long_generation():
    model = small_hybrid("samba")
    x = torch.randint(1, V, (1, 4))
    cache = model.new_cache()
    with torch.no_grad():
        seq = model.generate(x, **{GENERATION_CACHE_KEY: cache}, max_new_tokens=120, min_new_tokens=120, do_sample=False, pad_token_id=0)
    sizes = []
    for layer in cache.layers:
        if hasattr(layer, "keys") and layer.keys is not None:
            sizes.append(layer.keys.shape[2])
        else:
            sizes.append(sum(t.numel() for t in layer.states.values()))
    window = model.config.layers[1]["kwargs"]["window"]
    assert all(s == window - 1 for s in sizes[1::2])
    first = sizes[0::2]
    with torch.no_grad():
        more = model.generate(seq, **{GENERATION_CACHE_KEY: cache}, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
    assert more.shape[1] == 164 and cache.layers[1].keys.shape[2] == window - 1
    assert [sum(t.numel() for t in cache.layers[i].states.values()) for i in range(0, len(sizes), 2)] == first


def test_moe_sends_each_token_to_exactly_k_experts_and_aux_loss_reaches_router():
    moe = MoE(16, n_experts=4, top_k=2)
    x = torch.randn(3, 7, 16)
    y = moe(x)
    assert y.shape == x.shape
    assert moe.last_topk.shape == (21, 2)
    assert all(len(set(row.tolist())) == 2 for row in moe.last_topk)
    assert moe.aux_loss > 0
    moe.aux_loss.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_moe_output_equals_dense_weighted_sum_of_chosen_experts():
    moe = MoE(8, n_experts=3, top_k=2).eval()
    x = torch.randn(5, 8)
    probs = torch.softmax(moe.router(x), -1)
    w, idx = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    dense = torch.stack([sum(w[n, j] * moe.experts[idx[n, j]](x[n]) for j in range(2)) for n in range(5)])
    torch.testing.assert_close(moe(x), dense, rtol=1e-5, atol=1e-6)


def test_moe_aux_loss_is_added_to_the_lm_loss():
    cfg = ZooConfig(vocab_size=V, d_model=32, n_layers=2, mixers={"attention": {"n_heads": 4}}, mlp="moe",
                    moe={"n_experts": 4, "top_k": 2})
    model = ZooForCausalLM(cfg).train()
    x = torch.randint(0, V, (2, 8))
    out = model(x, labels=x)
    assert out.aux_loss is not None and out.aux_loss > 0
    out.loss.backward()
    assert model.model.layers[0].mlp.router.weight.grad.abs().sum() > 0


def test_bad_moe_settings_fail_clearly():
    with pytest.raises(zoo.ConfigError, match="top_k"):
        validate_model({"d_model": 32, "mixers": {"attention": {"n_heads": 4}}, "mlp": "moe", "moe": {"n_experts": 2, "top_k": 3}})
    with pytest.raises(zoo.ConfigError, match="n_expert"):
        validate_model({"d_model": 32, "mixers": {"attention": {"n_heads": 4}}, "mlp": "moe", "moe": {"n_expert": 2}})


def test_passkey_prompt_has_exact_length_and_contains_the_key():
    tok = ByteTokenizer()
    import random

    ex = make_passkey_example(tok, 300, 0.5, random.Random(0))
    assert ex.input_ids.shape == (300,)
    text = tok.decode(ex.input_ids)
    assert f"The pass key is {ex.passkey}" in text and text.endswith("The pass key is")
    assert tok.decode(ex.answer_ids) == " " + ex.passkey
    with pytest.raises(ValueError, match="too short"):
        make_passkey_example(tok, 20, 0.5, random.Random(0))


def test_passkey_evaluation_runs_with_chunked_prefill():
    cfg = ZooConfig(vocab_size=260, d_model=32, n_layers=2, pattern=["attention"], mixers={"attention": {"n_heads": 4, "window": 64}})
    model = ZooForCausalLM(cfg).eval()
    rows = evaluate_passkey(model, ByteTokenizer(), [200, 300], n_per_length=2, prefill_chunk_size=64, progress=False)
    assert [r["length"] for r in rows] == [200, 300]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)


def test_zoo_eval_passkey_over_lengths(tmp_path, capsys):
    from zoo.cli import main

    cfg = ZooConfig(vocab_size=260, d_model=32, n_layers=2, pattern=["attention"], mixers={"attention": {"n_heads": 4}})
    ZooForCausalLM(cfg).save_pretrained(tmp_path / "ckpt")
    assert main(["eval", str(tmp_path / "ckpt"), "--passkey", "200,260", "--passkey-n", "1", "--prefill-chunk", "64"]) == 0
    out = capsys.readouterr().out
    assert "passkey L=   200" in out and "passkey L=   260" in out
    assert main(["eval", str(tmp_path / "ckpt"), "--passkey", "abc"]) == 2
