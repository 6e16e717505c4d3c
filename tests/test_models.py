"""The model family: HF round trip, generation with the hybrid cache, padding, packing."""

import pytest
import torch
from conftest import assert_left_padded_batch_equals_separate, assert_packed_equals_separate
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import zoo
from zoo.models import ZooConfig, ZooForCausalLM


def tiny(pattern=("attention",), n_layers=2, vocab=97, d=32, mlp="swiglu", **mixers):
    mix = {"attention": {"n_heads": 4}, **mixers}
    return ZooConfig(vocab_size=vocab, d_model=d, n_layers=n_layers, pattern=list(pattern), mixers=mix, mlp=mlp)


def model_for(cfg, seed=0):
    torch.manual_seed(seed)
    return ZooForCausalLM(cfg).eval()


def test_auto_classes_are_registered():
    cfg = AutoConfig.for_model("zoo", d_model=32, mixers={"attention": {"n_heads": 4}})
    assert isinstance(cfg, ZooConfig)
    assert type(AutoModelForCausalLM.from_config(cfg)).__name__ == "ZooForCausalLM"
    assert type(AutoModel.from_config(cfg)).__name__ == "ZooModel"
    assert type(AutoModelForSequenceClassification.from_config(cfg)).__name__ == "ZooForSequenceClassification"


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model = model_for(tiny())
    x = torch.randint(0, 97, (2, 12))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed.weight.data_ptr()


@pytest.mark.parametrize("window", [None, 5])
def test_decode_matches_full_forward(window):
    cfg = tiny(attention={"n_heads": 4, "n_kv_heads": 2, "window": window})
    model = model_for(cfg)
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache()
        out = [model(x[:, :7], past_key_values=cache, use_cache=True).logits]
        for t in range(7, 16):
            out.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-4, atol=1e-5)
    if window:
        assert cache.layers[0].keys.shape[2] == window - 1  # KV trimmed to the window


def test_chunked_prefill_matches_one_shot():
    model = model_for(tiny(attention={"n_heads": 4, "window": 6}))
    x = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache()
        parts = [model(x[:, a:b], past_key_values=cache, use_cache=True).logits for a, b in [(0, 8), (8, 13), (13, 20)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)


def test_generate_with_cache_equals_without_cache():
    model = model_for(tiny())
    x = torch.randint(1, 97, (2, 6))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = model.generate(x, use_cache=True, **kw)
        b = model.generate(x, use_cache=False, **kw)
    assert torch.equal(a, b)


def test_beam_search_and_sampling_run():
    model = model_for(tiny(attention={"n_heads": 4, "window": 4}))
    x = torch.randint(1, 97, (2, 5))
    with torch.no_grad():
        beams = model.generate(x, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
        sampled = model.generate(x, max_new_tokens=6, do_sample=True, top_k=5, pad_token_id=0)
    assert beams.shape == (2, 11) and sampled.shape == (2, 11)


def test_left_padded_batch_equals_separate_sequences():
    assert_left_padded_batch_equals_separate(model_for(tiny()), (9, 5), 97, rtol=1e-4, atol=1e-5, max_new_tokens=5)


def test_packed_equals_separate_sequences():
    docs = [torch.randint(1, 97, (1, 7)), torch.randint(1, 97, (1, 4))]
    assert_packed_equals_separate(model_for(tiny()), docs, rtol=1e-4, atol=1e-5)


def test_packed_loss_does_not_predict_across_documents():
    model = model_for(tiny())
    a, b = torch.randint(1, 97, (1, 7)), torch.randint(1, 97, (1, 4))
    packed = torch.cat([a, b], 1)
    cu = torch.tensor([0, 7, 11])
    with torch.no_grad():
        loss = model(packed, labels=packed, cu_seqlens=cu).loss
        la, lb = model(a, labels=a).loss, model(b, labels=b).loss
    torch.testing.assert_close(loss, (la * 6 + lb * 3) / 9, rtol=1e-5, atol=1e-6)


def test_bidirectional_attention_classifier_uses_every_token():
    cfg = ZooConfig(vocab_size=50, d_model=32, n_layers=1, mixers={"attention": {"n_heads": 4, "causal": False}}, num_labels=3)
    model = zoo.build_model(cfg, head="classification").eval()
    x = torch.randint(0, 50, (2, 8))
    y = x.clone()
    y[:, 0] = (y[:, 0] + 1) % 50
    with torch.no_grad():
        out = model(x, labels=torch.tensor([0, 2]))
        assert out.logits.shape == (2, 3) and out.loss.isfinite()
        assert not torch.allclose(model(x).logits, model(y).logits)
    with pytest.raises(RuntimeError, match="cannot decode"):
        model.model(x, past_key_values=model.model.new_cache(), use_cache=True)


def test_state_size_of_attention_counts_kv():
    mixer = zoo.get_mixer("attention")(32, n_heads=4, n_kv_heads=2)
    assert mixer.state_size(10) == 2 * 2 * 8 * 10
    windowed = zoo.get_mixer("attention")(32, n_heads=4, window=4)
    assert windowed.state_size(100) == 2 * 4 * 8 * 4


@pytest.mark.parametrize("padded", [False, True])
def test_sliding_window_block_prefill_matches_dense_reference(padded):
    torch.manual_seed(0)
    attn = zoo.get_mixer("attention")(32, n_heads=4, n_kv_heads=2, window=5, rope=False).eval()
    x = torch.randn(2, 23, 32)
    mask = torch.ones(2, 23, dtype=torch.long)
    if padded:
        mask[1, :6] = 0
    with torch.no_grad():
        out = attn(x, attention_mask=mask if padded else None)
        q = attn.q_proj(x).view(2, 23, 4, 8).transpose(1, 2)
        k = attn.k_proj(x).view(2, 23, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
        v = attn.v_proj(x).view(2, 23, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
        i, j = torch.arange(23)[:, None], torch.arange(23)[None]
        allowed = (j <= i) & (i - j < 5) & mask.bool()[:, None, None, :]
        allowed = allowed | (i == j)
        scores = (q @ k.transpose(-1, -2)) / 8**0.5
        ref = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v
        ref = attn.o_proj(ref.transpose(1, 2).reshape(2, 23, 32))
    rows = slice(6, None) if padded else slice(None)
    torch.testing.assert_close(out[:, rows], ref[:, rows], rtol=1e-4, atol=1e-5)


def test_auto_tokenizer_loads_the_byte_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from zoo.data.tokenizer import ByteTokenizer

    ByteTokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(tok, ByteTokenizer) and tok.decode(tok("héllo")["input_ids"]) == "héllo"
