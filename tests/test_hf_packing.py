"""Packing as Hugging Face and TRL describe it equals separate documents (logits and loss).

``DataCollatorWithFlattening`` concatenates documents into one row with ``position_ids`` restarting at 0 (and, if
asked, ``cu_seq_lens_q/k`` + ``max_length_q/k`` or ``seq_idx``) and ``-100`` at each document's first label; the
model must read that packing, never let state cross a document, and refuse descriptions that disagree.
"""

import pytest
import torch
from transformers import DataCollatorWithFlattening

from zoo.config import apply_overrides, read_yaml, validate_model
from zoo.models import ZooConfig, ZooForCausalLM

V, D = 89, 64
LENGTHS = [7, 4, 9]
MODELS = {
    "attention": {"attention": {"n_heads": 4}},
    "mamba": {"mamba": {"d_state": 8}},
    "retnet": {"retnet": {"n_heads": 2, "chunk_size": 4}},
}


def build(name: str) -> ZooForCausalLM:
    torch.manual_seed(0)
    if name == "samba":
        data = read_yaml("configs/samba.yaml")
        over = [f"model.vocab_size={V}", f"model.d_model={D}", "model.n_layers=2", "model.mixers.attention.window=5",
                "model.tie_word_embeddings=false"]
        cfg = validate_model(apply_overrides(data, over)["model"])
    else:
        cfg = ZooConfig(vocab_size=V, d_model=D, n_layers=2, pattern=[name], mixers=MODELS[name], tie_word_embeddings=False)
    return ZooForCausalLM(cfg).eval()


def documents(lengths=LENGTHS, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g) for n in lengths]


def separate(model, docs):
    """Per-document logits and the token-weighted mean loss over all documents, each run alone."""
    logits, total, count = [], 0.0, 0
    with torch.no_grad():
        for d in docs:
            out = model(d[None], labels=d[None])
            logits.append(out.logits[0])
            total, count = total + out.loss * (len(d) - 1), count + len(d) - 1
    return logits, total / count


def assert_equals_separate(out, docs, ref_logits, ref_loss, offsets=None):
    flat = out.logits.reshape(-1, out.logits.shape[-1])
    start = 0
    for d, ref in zip(docs, ref_logits):
        torch.testing.assert_close(flat[start : start + len(d)], ref, rtol=1e-4, atol=1e-4)
        start += len(d)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flash_kwargs", [False, True])
@pytest.mark.parametrize("name", [*MODELS, "samba"])
def test_hf_flattening_collator_equals_separate_documents(name, flash_kwargs):
    model, docs = build(name), documents()
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": d.tolist()} for d in docs])
    assert "position_ids" in batch and ("cu_seq_lens_q" in batch) == flash_kwargs
    ref_logits, ref_loss = separate(model, docs)
    with torch.no_grad():
        out = model(**batch)
        assert_equals_separate(out, docs, ref_logits, ref_loss)
        # The same row without its packing lets state cross documents: the comparison above can fail.
        leaky = model(batch["input_ids"]).logits[0, LENGTHS[0] : LENGTHS[0] + LENGTHS[1]]
    assert (leaky - ref_logits[1]).abs().max() > 1e-3


def test_seq_idx_and_cu_seqlens_agreeing_with_position_ids_are_accepted():
    model, docs = build("mamba"), documents()
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(
        [{"input_ids": d.tolist()} for d in docs]
    )
    ref_logits, ref_loss = separate(model, docs)
    with torch.no_grad():
        out = model(**batch, cu_seqlens=batch["cu_seq_lens_q"].long())
        assert_equals_separate(out, docs, ref_logits, ref_loss)
        only_seq_idx = model(batch["input_ids"], labels=batch["labels"], seq_idx=batch["seq_idx"])
        assert_equals_separate(only_seq_idx, docs, ref_logits, ref_loss)


@pytest.mark.parametrize("name", ["attention", "mamba"])
def test_trl_style_packed_rows_with_batch_above_one_equal_separate_documents(name):
    # Two rows of equal length, each holding two documents, position_ids restarting per document, no padding.
    model = build(name)
    docs = documents([5, 6, 8, 3], seed=1)
    ids = torch.stack([torch.cat(docs[:2]), torch.cat(docs[2:])])
    pos = torch.stack([torch.cat([torch.arange(len(d)) for d in docs[:2]]), torch.cat([torch.arange(len(d)) for d in docs[2:]])])
    ref_logits, ref_loss = separate(model, docs)
    with torch.no_grad():
        out = model(ids, position_ids=pos, labels=ids)
    assert_equals_separate(out, docs, ref_logits, ref_loss)


def test_ordinary_position_ids_are_not_packing():
    model = build("mamba")
    x = torch.randint(1, V, (2, 10))
    with torch.no_grad():
        ref = model(x, labels=x)
        out = model(x, position_ids=torch.arange(10).expand(2, 10), labels=x)
        shifted = model(x, position_ids=torch.arange(10)[None] + 5, labels=x)  # consecutive from any start
    for o in (out, shifted):
        torch.testing.assert_close(o.logits, ref.logits, rtol=0, atol=0)
        torch.testing.assert_close(o.loss, ref.loss, rtol=0, atol=0)


def test_disagreeing_packing_descriptions_are_refused():
    model, docs = build("attention"), documents()
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d.tolist()} for d in docs])
    ids, pos = batch["input_ids"], batch["position_ids"]
    with torch.no_grad():
        with pytest.raises(ValueError, match="different packed documents"):
            model(ids, position_ids=pos, cu_seqlens=torch.tensor([0, 11, 20]))
        with pytest.raises(ValueError, match="different packed documents"):
            model(ids, cu_seqlens=torch.tensor([0, 20]), position_ids=pos)
        with pytest.raises(ValueError, match="cu_seq_lens_k differs"):
            model(ids, cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=torch.tensor([0, 20], dtype=torch.int32))
        with pytest.raises(ValueError, match="max_length_q"):
            model(ids, cu_seq_lens_q=batch["cu_seq_lens_q"], max_length_q=3)
        with pytest.raises(ValueError, match="packing and padding together"):
            model(ids, position_ids=pos, attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([0]), 0))
        with pytest.raises(ValueError, match="cannot be decoded with a cache"):
            model(ids, position_ids=pos, use_cache=True)
        with pytest.raises(ValueError, match="batch size 2"):
            model(ids.expand(2, -1), cu_seq_lens_q=batch["cu_seq_lens_q"])
