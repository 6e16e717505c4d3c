"""Data: MQAR as Zoology generates it, the other synthetic tasks, local text files and the byte tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zoo.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    build_task,
    copying,
    induction,
    load_text_task,
    load_tokenizer,
    multiquery_ar,
    selective_copying,
)
from zoo.data.mqar import sample_without_replacement, weighted_sample_without_replacement
from zoo.train.config import TaskConfig

V, L, KV = 128, 64, 4


@pytest.fixture(scope="module")
def mqar():
    return multiquery_ar(2000, vocab_size=V, seq_len=L, num_kv_pairs=KV, seed=0)


def test_mqar_labels_only_at_query_value_positions(mqar):
    x, y = mqar.input_ids, mqar.labels
    assert x.shape == y.shape == (2000, L)
    labelled = y != IGNORE_INDEX
    assert (labelled.sum(1) == KV).all()
    assert not labelled[:, : 2 * KV + 1].any()  # nothing in the context
    rows, cols = labelled.nonzero(as_tuple=True)
    # the position before a label holds a key; the label is that key's value from the context
    keys = x[rows, cols - 1]
    assert ((keys >= 1) & (keys < V // 2)).all()
    ctx_keys, ctx_vals = x[:, 0 : 2 * KV : 2], x[:, 1 : 2 * KV : 2]
    match = ctx_keys[rows] == keys[:, None]
    assert (match.sum(1) == 1).all()
    assert (ctx_vals[rows][match] == y[rows, cols]).all()
    assert ((cols - 2 * KV) % 2 == 1).all()  # query keys sit at even offsets of the query region


def test_mqar_keys_values_in_ranges_without_repeats(mqar):
    x = mqar.input_ids
    keys, vals = x[:, 0 : 2 * KV : 2], x[:, 1 : 2 * KV : 2]
    assert ((keys >= 1) & (keys < V // 2)).all()
    assert ((vals >= V // 2) & (vals < V)).all()
    for t in (keys, vals):
        s = t.sort(1).values
        assert (s[:, 1:] != s[:, :-1]).all()
    query = x[:, 2 * KV :]
    assert ((query == 0) | ((query >= 1) & (query < V // 2))).all()  # filler 0 or a query key
    assert ((query != 0).sum(1) == KV).all()  # each key is asked exactly once


def test_mqar_gaps_favour_short_distances(mqar):
    # p(g) ∝ (g+1)^(a-1) with a = 0.01: the first query slot is the most likely one.
    q = mqar.input_ids[:, 2 * KV :: 2] != 0  # (N, space) occupancy of each query slot
    freq = q.float().mean(0)
    assert freq[0] > freq[-1]
    assert freq.argmax() == 0


def test_mqar_seeded_determinism():
    a = multiquery_ar(100, vocab_size=V, seed=3)
    b = multiquery_ar(100, vocab_size=V, seed=3)
    c = multiquery_ar(100, vocab_size=V, seed=4)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_mqar_zoology_size_generates_in_chunks():
    # 100k examples (Zoology's train size) span several generation chunks; all rows stay valid.
    d = multiquery_ar(100_000, vocab_size=8192, seq_len=64, num_kv_pairs=4, seed=0)
    assert len(d) == 100_000
    assert ((d.labels != IGNORE_INDEX).sum(1) == 4).all()
    assert not torch.equal(d.input_ids[:10], d.input_ids[16384:16394])


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"seq_len": 63}, "task.seq_len"),
        ({"seq_len": 12, "num_kv_pairs": 4}, "task.seq_len"),
        ({"vocab_size": 8}, "task.vocab_size"),
        ({"num_kv_pairs": 0}, "task.num_kv_pairs"),
        ({"power_a": 0.0}, "task.power_a"),
    ],
)
def test_mqar_bad_arguments_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        multiquery_ar(4, **kwargs)


def test_sample_without_replacement_is_uniform_and_distinct():
    rng = np.random.default_rng(0)
    for pop, k in ((10, 3), (6, 6), (100, 8)):
        x = sample_without_replacement(rng, 20000, pop, k)
        s = np.sort(x, 1)
        assert (s[:, 1:] != s[:, :-1]).all() and x.min() >= 0 and x.max() < pop
        freq = np.bincount(x.ravel(), minlength=pop) / x.size * pop
        assert np.allclose(freq, 1.0, atol=0.15)


def test_weighted_sampling_follows_p():
    rng = np.random.default_rng(0)
    p = np.array([0.7, 0.2, 0.1])
    first = weighted_sample_without_replacement(rng, 50000, p, 2)[:, 0]
    assert np.allclose(np.bincount(first, minlength=3) / 50000, p, atol=0.01)


def test_copying_answer_repeats_the_data():
    d = copying(50, vocab_size=10, seq_len=40, num_tokens=8, seed=0)
    x, y = d.input_ids, d.labels
    assert torch.equal(x[:, :8], x[:, -8:])
    assert (x[:, -9] == 1).all() and (x[:, 8:-9] == 0).all()
    assert torch.equal(y[:, -8:], x[:, :8]) and (y[:, :-8] == IGNORE_INDEX).all()
    assert ((x[:, :8] >= 2) & (x[:, :8] < 10)).all()


def test_selective_copying_keeps_order_of_scattered_tokens():
    d = selective_copying(50, vocab_size=10, seq_len=40, num_tokens=8, seed=0)
    x, y = d.input_ids, d.labels
    ctx = x[:, :-9]
    for row in range(50):
        data = ctx[row][ctx[row] != 0]
        assert torch.equal(data, x[row, -8:])
    assert torch.equal(y[:, -8:], x[:, -8:]) and (x[:, -9] == 1).all()
    assert (y[:, :-8] == IGNORE_INDEX).all()


def test_induction_target_follows_the_trigger():
    d = induction(100, vocab_size=12, seq_len=32, seed=0)
    x, y = d.input_ids, d.labels
    assert ((x == 1).sum(1) == 2).all() and (x[:, -2] == 1).all()
    first = (x[:, :-2] == 1).float().argmax(1)
    assert torch.equal(x[torch.arange(100), first + 1], y[:, -1])
    assert (y[:, :-1] == IGNORE_INDEX).all()


def test_copying_too_short_sequence_names_the_key():
    with pytest.raises(ValueError, match=r"task\.seq_len"):
        copying(2, seq_len=10, num_tokens=8)


@pytest.mark.parametrize("name", ["mqar", "copying", "selective_copying", "induction"])
def test_build_task_synthetic_train_and_eval_differ(name):
    cfg = TaskConfig(name=name, seq_len=32, vocab_size=64, num_kv_pairs=2, num_tokens=4, num_train=64, num_test=16)
    train, evalset = build_task(cfg)
    assert len(train) == 64 and len(evalset) == 16 and train.seq_len == 32
    assert not torch.equal(train.input_ids[:16], evalset.input_ids)
    again, _ = build_task(cfg)
    assert torch.equal(train.input_ids, again.input_ids)


# ----- text --------------------------------------------------------------------------------------------

DOCS = [f"document number {i}: the quick brown fox jumps over the lazy dog." for i in range(40)]


def _write(tmp_path, fmt: str):
    if fmt == "txt":
        p = tmp_path / "data.txt"
        p.write_text("\n".join(DOCS) + "\n")
    elif fmt == "jsonl":
        p = tmp_path / "data.jsonl"
        p.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    elif fmt == "json":
        p = tmp_path / "data.json"
        p.write_text(json.dumps([{"body": d, "id": i} for i, d in enumerate(DOCS)]))
    elif fmt == "csv":
        import csv

        p = tmp_path / "data.csv"
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "body"])
            w.writerows([i, d] for i, d in enumerate(DOCS))
    else:
        import datasets

        p = tmp_path / "data.parquet"
        datasets.Dataset.from_dict({"body": DOCS, "id": list(range(len(DOCS)))}).to_parquet(str(p))
    return p


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "json", "csv", "parquet"])
def test_text_files_load_into_blocks(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    train, evalset = load_text_task(str(path), seq_len=32, text_column="body", eval_fraction=0.1)
    total = sum(len(d.encode()) + 1 for d in DOCS)  # bytes + one eos per document
    assert len(train) + len(evalset) == total // 32 and len(evalset) >= 1
    assert torch.equal(train.input_ids, train.labels)
    tok = ByteTokenizer()
    text = tok.decode(train.input_ids[0].tolist(), skip_special_tokens=True)
    assert text.startswith("document number 0:")
    assert (train.input_ids == tok.eos_token_id).any()


def test_text_missing_column_lists_the_columns(tmp_path):
    path = _write(tmp_path, "jsonl")
    with pytest.raises(ValueError, match=r"task\.text_column.*'text'.*body, id"):
        load_text_task(str(path), seq_len=32)


def test_text_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"task\.path"):
        load_text_task(str(tmp_path / "nope.jsonl"), seq_len=32)
    bad = tmp_path / "data.xyz"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="extension"):
        load_text_task(str(bad), seq_len=32)


def test_text_too_little_data_says_so(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text("hi\n")
    with pytest.raises(ValueError, match=r"task\.seq_len"):
        load_text_task(str(p), seq_len=64)


def test_text_with_local_hf_tokenizer(tmp_path):
    tok_dir = tmp_path / "tok"
    ByteTokenizer().save_pretrained(tok_dir)
    path = _write(tmp_path, "txt")
    train, _ = build_task(TaskConfig(name="text", path=str(path), seq_len=16, tokenizer=str(tok_dir)))
    assert len(train) > 0 and int(train.input_ids.max()) < 259


# ----- tokenizer -------------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    text = "héllo, wörld! ✓"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert len(tok) == 259 and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text


def test_byte_tokenizer_save_load(tmp_path):
    tok = ByteTokenizer()
    tok.save_pretrained(tmp_path)
    back = load_tokenizer(str(tmp_path))
    assert isinstance(back, ByteTokenizer)
    assert back("abc")["input_ids"] == [97, 98, 99] and back.eos_token_id == 258
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_load_tokenizer_bad_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"task\.tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))


@pytest.mark.parametrize("task", ["mqar", "copying", "selective_copying", "induction"])
def test_shipped_task_configs_build_and_fit_the_model_vocab(task):
    import zoo
    from zoo.config import CONFIG_DIR

    run = zoo.load_config([CONFIG_DIR / "attention.yaml", CONFIG_DIR / "tasks" / f"{task}.yaml"],
                          ["task.num_train=64", "task.num_test=8"])
    train, evalset = build_task(run.task)
    assert run.task.name == task and train.seq_len == run.task.seq_len and len(evalset) == 8
    assert int(train.input_ids.max()) < run.model.vocab_size
