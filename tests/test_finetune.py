"""Fine-tuning on transformers' Trainer: causal LM, classifier, packing, LoRA, resume, and the bad inputs."""

from __future__ import annotations

import json
import random

import pytest
import torch

import zoo
from zoo import finetune as ft

peft = pytest.importorskip("peft", reason="LoRA tests need the [peft] extra (pip install 'seq-zoo[peft]')")


def recurrent_mixer() -> str | None:
    """The first registered recurrent mixer among the preferred ones (None when none is registered)."""
    names = zoo.list_mixers()
    return next((m for m in ("mamba", "hgrn", "mingru") if m in names), None)


def needs_recurrent() -> str:
    rec = recurrent_mixer()
    assert rec is not None, "a recurrent mixer (mamba, hgrn or mingru) must be registered"
    return rec


def write_data(path, n=48, seed=0) -> str:
    """Tiny labelled text: the label is written at the end of each line, so both tasks are learnable."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            words = " ".join(rng.choice(["ab", "cd", "ef"]) for _ in range(rng.randint(2, 8)))
            f.write(json.dumps({"text": f"{words} {'yes' if label == 'pos' else 'no'}", "label": label}) + "\n")
    return str(path)


def save_base(path, pattern, vocab=260, d=32) -> str:
    torch.manual_seed(0)
    cfg = zoo.ZooConfig(vocab_size=vocab, d_model=d, n_layers=len(pattern), pattern=list(pattern),
                        mixers={"attention": {"n_heads": 4}})
    zoo.ZooForCausalLM(cfg).save_pretrained(path)
    return str(path)


def initial_loss(model_dir: str, data: str) -> float:
    """Mean causal-LM loss of the untrained checkpoint on the data (one padded batch)."""
    model = zoo.ZooForCausalLM.from_pretrained(model_dir).eval()
    tok = ft.load_tokenizer_for(model_dir, "byte")
    rows = [{"input_ids": p} for p in ft.split_documents(ft.encode_documents(
        list(ft.load_table(data)["text"]), tok), 64, tok.eos_token_id)]
    batch = ft.PaddedCollator(tok.pad_token_id)(rows)
    with torch.no_grad():
        return float(model(**batch).loss)


FAST = {"max_steps": 12, "batch_size": 8, "lr": 3e-3, "seq_len": 64, "progress": False, "logging_steps": 4}


@pytest.mark.parametrize("kind", ["recurrent", "hybrid"])
def test_causal_lm_loss_goes_down_and_checkpoint_reloads(tmp_path, kind):
    rec = needs_recurrent()
    pattern = [rec, rec] if kind == "recurrent" else [rec, "attention"]
    base = save_base(tmp_path / "base", pattern)
    data = write_data(tmp_path / "d.jsonl")
    metrics = ft.finetune(model=base, data=data, out=str(tmp_path / "out"), eval_data=data, **FAST)
    assert metrics["eval_loss"] < initial_loss(base, data)
    model = ft.load_finetuned(metrics["final"])
    assert isinstance(model, zoo.ZooForCausalLM) and model.config.mixer_names == pattern
    assert initial_loss(metrics["final"], data) == pytest.approx(metrics["eval_loss"], rel=1e-4)
    assert (tmp_path / "out" / "final" / "tokenizer_config.json").is_file()


def test_classifier_learns_and_reloads_with_label_names(tmp_path):
    rec = needs_recurrent()
    base = save_base(tmp_path / "base", [rec, "attention"])
    data = write_data(tmp_path / "d.jsonl", n=64)
    metrics = ft.finetune(model=base, data=data, out=str(tmp_path / "out"), task="classification",
                          eval_data=data, **{**FAST, "max_steps": 30})
    assert metrics["eval_loss"] < 0.69  # below chance (ln 2)
    model = ft.load_finetuned(metrics["final"])
    assert isinstance(model, zoo.ZooForSequenceClassification)
    assert model.config.id2label == {0: "neg", 1: "pos"}


@pytest.mark.parametrize("pattern", [("attention",), ("recurrent", "attention")])
def test_packed_fine_tuning_gives_the_unpacked_per_document_loss(tmp_path, pattern):
    rec = needs_recurrent() if "recurrent" in pattern else None
    pattern = [rec if p == "recurrent" else p for p in pattern]
    base = save_base(tmp_path / "base", pattern)
    model = zoo.ZooForCausalLM.from_pretrained(base).eval()
    tok = ft.load_tokenizer_for(base, "byte")
    docs = ft.encode_documents(["ab cd ef", "a much longer document here", "x", "fine tuning"], tok)
    pieces = ft.split_documents(docs, 16, tok.eos_token_id)
    rows = ft.pack_documents(pieces, 40)
    assert all(len(r["input_ids"]) <= 40 for r in rows) and sum(len(r["lengths"]) for r in rows) == len(pieces)
    batch = ft.PackedCollator()(rows)
    assert batch["input_ids"].shape[0] == 1 and batch["cu_seqlens"][-1] == batch["input_ids"].shape[1]
    with torch.no_grad():
        packed = ft.per_document_loss(model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"]).logits,
                                      batch["input_ids"], batch["cu_seqlens"])
        alone = torch.stack([model(torch.tensor([p]), labels=torch.tensor([p])).loss for p in pieces])
        row_loss = model(**batch).loss  # what the Trainer optimises: the token-weighted mean of the documents
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    weights = torch.tensor([len(p) - 1 for p in pieces], dtype=torch.float)
    torch.testing.assert_close(row_loss, (alone * weights).sum() / weights.sum(), rtol=1e-4, atol=1e-5)


def test_packed_trainer_run_trains(tmp_path):
    rec = needs_recurrent()
    base = save_base(tmp_path / "base", [rec, "attention"])
    data = write_data(tmp_path / "d.jsonl")
    metrics = ft.finetune(model=base, data=data, out=str(tmp_path / "out"), pack=True, eval_data=data,
                          gradient_checkpointing=True, **{**FAST, "batch_size": 2})
    assert metrics["eval_loss"] < initial_loss(base, data)


def test_lora_adapter_saves_and_loads(tmp_path):
    rec = needs_recurrent()
    base = save_base(tmp_path / "base", [rec, "attention"])
    data = write_data(tmp_path / "d.jsonl")
    model = zoo.ZooForCausalLM.from_pretrained(base)
    targets = ft.default_lora_targets(model)
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(targets)
    metrics = ft.finetune(model=base, data=data, out=str(tmp_path / "out"), lora=True, eval_data=data, **FAST)
    adapter = tmp_path / "out" / "final" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    merged = ft.load_finetuned(metrics["final"]).eval()
    via_adapter = ft.load_finetuned(adapter).eval()
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, via_adapter(x).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(merged(x).logits, model.eval()(x).logits)  # the adapter changed the model


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    base = save_base(tmp_path / "base", ["attention"])
    data = write_data(tmp_path / "d.jsonl")
    out = str(tmp_path / "out")
    ft.finetune(model=base, data=data, out=out, save_steps=4, **{**FAST, "max_steps": 4})
    assert (tmp_path / "out" / "checkpoint-4").is_dir()
    metrics = ft.finetune(model=base, data=data, out=out, resume=True, save_steps=4, **{**FAST, "max_steps": 8})
    assert metrics["steps"] == 8


def test_cli_parser_maps_flags_to_the_config(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    ft.add_finetune_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["finetune", "ckpt", "--data", "d.jsonl", "--out", "o", "--pack", "--lora",
                              "--lora-targets", "in_proj", "out_proj", "--lr", "1e-3", "--task", "causal_lm"])
    assert args.pack and args.lora and args.lora_targets == ["in_proj", "out_proj"] and args.lr == 1e-3


def test_training_arguments_flags_come_through_hf_argument_parser(tmp_path):
    """Every TrainingArguments field is a flag: ours under their zoo name or their own, the others pass through."""
    import argparse

    parser = argparse.ArgumentParser()
    ft.add_finetune_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["finetune", "ckpt", "--data", "d.jsonl", "--out", "o", "--learning-rate", "2e-3",
                              "--optim", "adafactor", "--adam-beta2", "0.95"])
    cfg = ft.config_from_args(args)
    assert cfg.lr == 2e-3 and cfg.extra == {"optim": "adafactor", "adam_beta2": 0.95}
    assert ft.config_from_args(parser.parse_args(["finetune", "ckpt", "--data", "d", "--out", "o"])).extra == {}
    base = save_base(tmp_path / "base", ["attention"])
    data = write_data(tmp_path / "d.jsonl", n=4)
    with pytest.raises(ft.FinetuneError, match="extra: learning_rate are set by zoo finetune"):
        ft.finetune(model=base, data=data, out=str(tmp_path / "out"), extra={"learning_rate": 1.0}, **FAST)


# ----- bad inputs: one clear sentence each ------------------------------------------------------------

def test_missing_text_column_names_the_columns(tmp_path):
    base = save_base(tmp_path / "base", ["attention"])
    data = tmp_path / "d.jsonl"
    data.write_text('{"body": "hello", "label": 0}\n')
    with pytest.raises(ft.FinetuneError, match="column 'text' is not in .* its columns are body, label"):
        ft.finetune(model=base, data=str(data), out=str(tmp_path / "out"), **FAST)


def test_tokenizer_larger_than_the_vocab_fails(tmp_path):
    base = save_base(tmp_path / "base", ["attention"], vocab=128)
    data = write_data(tmp_path / "d.jsonl", n=4)
    with pytest.raises(ft.FinetuneError, match="259 tokens but the model's vocabulary has 128.*--resize-embeddings"):
        ft.finetune(model=base, data=data, out=str(tmp_path / "out"), **FAST)


def test_resize_embeddings_grows_the_vocab(tmp_path):
    base = save_base(tmp_path / "base", ["attention"], vocab=128)
    data = write_data(tmp_path / "d.jsonl", n=8)
    metrics = ft.finetune(model=base, data=data, out=str(tmp_path / "out"), resize_embeddings=True,
                          **{**FAST, "max_steps": 2})
    assert ft.load_finetuned(metrics["final"]).config.vocab_size >= 259


def test_lora_target_that_matches_nothing_fails(tmp_path):
    base = save_base(tmp_path / "base", ["attention"])
    data = write_data(tmp_path / "d.jsonl", n=4)
    with pytest.raises(ft.FinetuneError, match="nonexistent_proj match no Linear layer.*choose among .*q_proj"):
        ft.finetune(model=base, data=data, out=str(tmp_path / "out"), lora=True,
                    lora_targets=["nonexistent_proj"], **FAST)


def test_bad_model_path_and_resume_without_checkpoint(tmp_path):
    data = write_data(tmp_path / "d.jsonl", n=4)
    with pytest.raises(ft.FinetuneError, match="neither a checkpoint folder"):
        ft.finetune(model=str(tmp_path / "nope"), data=data, out=str(tmp_path / "out"), **FAST)
    base = save_base(tmp_path / "base", ["attention"])
    with pytest.raises(ft.FinetuneError, match="holds no checkpoint"):
        ft.finetune(model=base, data=data, out=str(tmp_path / "out2"), resume=True, **FAST)


def test_missing_data_file_fails(tmp_path):
    base = save_base(tmp_path / "base", ["attention"])
    with pytest.raises(ft.FinetuneError, match="not a local file"):
        ft.finetune(model=base, data=str(tmp_path / "missing.jsonl"), out=str(tmp_path / "out"), **FAST)


def test_every_registered_mixer_has_default_lora_targets():
    for name in zoo.list_mixers():
        cfg = zoo.ZooConfig(vocab_size=64, d_model=64, n_layers=1, pattern=[name], mixers={"attention": {"n_heads": 4}})
        model = zoo.ZooForCausalLM(cfg)
        assert ft.default_lora_targets(model), f"{name}: no Linear layer for LoRA"
