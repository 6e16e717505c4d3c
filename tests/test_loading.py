"""zoo.loading: model + tokenizer from a directory (tokenizer beside the checkpoint, else bytes), the one path that
zoo eval, zoo generate, zoo finetune and the evaluation harness share."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.data.tokenizer import ByteTokenizer
from zoo.loading import LoadError, find_checkpoint, load_model, load_model_and_tokenizer
from zoo.train.checkpoint import CheckpointError


def save(path, *, tokenizer: bool, head: str = "causal_lm"):
    torch.manual_seed(0)
    cfg = zoo.ZooConfig(vocab_size=260, d_model=32, n_layers=1, mixers={"attention": {"n_heads": 4}}, num_labels=2)
    zoo.build_model(cfg, head=head).save_pretrained(path)
    if tokenizer:
        ByteTokenizer().save_pretrained(path)
    return path


def test_tokenizer_beside_the_checkpoint_else_bytes(tmp_path):
    model, tok = load_model_and_tokenizer(save(tmp_path / "own", tokenizer=True))
    assert isinstance(model, zoo.ZooForCausalLM) and isinstance(tok, ByteTokenizer)
    assert tok.name_or_path == str(tmp_path / "own")  # read from the folder
    _, tok = load_model_and_tokenizer(save(tmp_path / "bare", tokenizer=False))
    assert isinstance(tok, ByteTokenizer) and tok.name_or_path != str(tmp_path / "bare")
    with pytest.raises(LoadError, match="--tokenizer"):
        load_model_and_tokenizer(tmp_path / "own", str(tmp_path / "no-such-tokenizer"))


def test_run_directory_resolves_to_final_and_missing_paths_fail(tmp_path):
    save(tmp_path / "run" / "final", tokenizer=False)
    assert find_checkpoint(tmp_path / "run") == tmp_path / "run" / "final"
    with pytest.raises(CheckpointError, match="does not exist; pass a folder written by"):
        find_checkpoint(tmp_path / "nope")


def test_the_head_comes_from_the_checkpoint_and_causal_lm_is_enforced_when_asked(tmp_path):
    path = save(tmp_path / "cls", tokenizer=False, head="classification")
    assert isinstance(load_model(path), zoo.ZooForSequenceClassification)
    with pytest.raises(LoadError, match="ZooForSequenceClassification; .* need a causal-LM checkpoint"):
        load_model(path, causal_lm=True)
