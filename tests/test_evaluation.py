"""Evaluation: the lm-eval adapter on local task files (no download) and perplexity on a local text file."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.data.tokenizer import ByteTokenizer
from zoo.evaluation import EvalError, load_for_eval, perplexity


def recurrent_mixer() -> str | None:
    names = zoo.list_mixers()
    return next((m for m in ("mamba", "hgrn", "mingru") if m in names), None)


def save_checkpoint(path, pattern=("attention",), vocab=260) -> str:
    torch.manual_seed(0)
    cfg = zoo.ZooConfig(vocab_size=vocab, d_model=32, n_layers=len(pattern), pattern=list(pattern),
                        mixers={"attention": {"n_heads": 4}})
    zoo.ZooForCausalLM(cfg).save_pretrained(path)
    ByteTokenizer().save_pretrained(path)
    return str(path)


def token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, computed directly."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    return F.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_perplexity_matches_the_direct_computation(tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt")
    text = tmp_path / "t.txt"
    text.write_text("hello world\nsecond line\n")
    model, tok = load_for_eval(ckpt)
    res = perplexity(model, tok, text, seq_len=1024, progress=False)
    ids = list(b"hello world") + [tok.eos_token_id] + list(b"second line") + [tok.eos_token_id]
    lp = token_logprobs(model, ids)
    assert res["tokens"] == len(ids) - 1
    assert res["perplexity"] == pytest.approx(math.exp(-float(lp.mean())), rel=1e-4)
    short = perplexity(model, tok, text, seq_len=8, batch_size=2, progress=False)
    assert short["tokens"] < res["tokens"]  # the first token of every block is not scored


def test_perplexity_rejects_a_tokenizer_larger_than_the_vocab(tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt", vocab=64)
    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    model, tok = load_for_eval(ckpt)
    with pytest.raises(ValueError, match="produces id .* vocabulary has 64; use the tokenizer"):
        perplexity(model, tok, text, progress=False)


def test_missing_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(EvalError, match="does not exist; pass a folder"):
        load_for_eval(tmp_path / "nope")


def test_classifier_checkpoint_is_refused(tmp_path):
    cfg = zoo.ZooConfig(vocab_size=260, d_model=32, n_layers=1, mixers={"attention": {"n_heads": 4}}, num_labels=2)
    zoo.build_model(cfg, head="classification").save_pretrained(tmp_path / "cls")
    with pytest.raises(EvalError, match="ZooForSequenceClassification; lm-eval and perplexity need a causal-LM"):
        load_for_eval(tmp_path / "cls")


def test_train_run_folder_resolves_to_its_final_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "run" / "final")
    model, tok = load_for_eval(tmp_path / "run")
    assert isinstance(model, zoo.ZooForCausalLM) and isinstance(tok, ByteTokenizer)


def test_lm_eval_is_imported_only_when_the_adapter_is_used(monkeypatch):
    import subprocess
    import sys

    code = "import sys, zoo.evaluation; print('lm_eval' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    from zoo.evaluation import harness

    monkeypatch.setattr(harness, "HAVE_LM_EVAL", False)
    harness._zoo_lm_class.cache_clear()
    try:
        with pytest.raises(EvalError, match=r"lm-eval is not installed; install the eval extra"):
            harness.ZooLM(None, None)
    finally:
        harness._zoo_lm_class.cache_clear()


lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval adapter needs the [eval] extra (pip install 'seq-zoo[eval]')")


def req(*args):
    return types.SimpleNamespace(args=args)


@pytest.mark.parametrize("kind", ["attention", "hybrid"])
def test_zoo_lm_loglikelihood_and_rolling_equal_direct_scores(tmp_path, kind):
    from zoo.evaluation import ZooLM

    rec = recurrent_mixer()
    pattern = ["attention"] if kind == "attention" else [rec, "attention"]
    model, tok = load_for_eval(save_checkpoint(tmp_path / "ckpt", pattern))
    lm = ZooLM(model, tok, batch_size=2, max_length=64, progress=False)
    pairs = [("The cat", " sat"), ("A", " much longer continuation"), ("x", "y")]
    got = lm.loglikelihood([req(c, t) for c, t in pairs])
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ids = list(ctx.encode()) + list(cont.encode())
        want = float(token_logprobs(model, ids)[-len(cont.encode()):].sum())
        assert ll == pytest.approx(want, rel=1e-4, abs=1e-4) and isinstance(greedy, bool)
    text = "rolling text that is longer than one window of sixty-four tokens, so it needs two windows in all"
    (rolled,) = lm.loglikelihood_rolling([req(text)])
    ids = [lm.prefix_id] + list(text.encode())
    # window 1 scores ids[1:65] from ids[:64]; window 2 scores the rest with the 64 tokens before each one
    rest = len(ids) - 65
    lp = torch.cat([token_logprobs(model, ids[:65]), token_logprobs(model, ids[rest:])[-rest:]])
    assert len(ids) > 65 and rolled == pytest.approx(float(lp.sum()), rel=1e-4)


def test_zoo_lm_generate_until_stops_at_the_stop_string(tmp_path):
    from zoo.evaluation import ZooLM

    model, tok = load_for_eval(save_checkpoint(tmp_path / "ckpt"))
    lm = ZooLM(model, tok, progress=False)
    (free,) = lm.generate_until([req("abc", {"max_gen_toks": 12, "until": []})])
    stop = free[2:4] if len(free) >= 4 else "\x00never"
    (cut,) = lm.generate_until([req("abc", {"max_gen_toks": 12, "until": [stop]})])
    assert free.startswith(cut) and stop not in cut


def write_tasks(tmp_path) -> str:
    data = tmp_path / "qa.jsonl"
    rows = [{"question": f"Q{i}: colour?", "choices": [" red", " blue"], "answer": i % 2, "text": f"doc {i} text"}
            for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tasks / "zoo_mc.yaml").write_text(
        "task: zoo_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )
    (tasks / "zoo_rolling.yaml").write_text(
        "task: zoo_rolling\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    (tasks / "zoo_gen.yaml").write_text(
        "task: zoo_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{choices[answer]}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )
    return str(tasks)


def test_run_lm_eval_on_local_task_files(tmp_path):
    from zoo.evaluation import run_lm_eval

    rec = recurrent_mixer()
    ckpt = save_checkpoint(tmp_path / "ckpt", [rec, "attention"] if rec else ["attention"])
    out = tmp_path / "results.json"
    res = run_lm_eval(ckpt, "zoo_mc,zoo_rolling,zoo_gen", include_path=write_tasks(tmp_path), batch_size=2,
                      output_path=out, progress=False)
    assert 0.0 <= res["zoo_mc"]["acc,none"] <= 1.0
    assert res["zoo_rolling"]["word_perplexity,none"] > 1.0
    assert "exact_match,none" in res["zoo_gen"]
    assert json.loads(out.read_text())["results"]["zoo_mc"]["acc,none"] == res["zoo_mc"]["acc,none"]


def test_unknown_task_fails_naming_the_fix(tmp_path):
    from zoo.evaluation import run_lm_eval

    ckpt = save_checkpoint(tmp_path / "ckpt")
    with pytest.raises(EvalError, match="unknown lm-eval task.*zoo_nope.*--include-path"):
        run_lm_eval(ckpt, ["zoo_nope"], include_path=write_tasks(tmp_path), include_defaults=False, progress=False)


def test_cli_arguments_run_perplexity_and_tasks(tmp_path, capsys):
    import argparse

    from zoo.evaluation import add_eval_parser, run_eval

    ckpt = save_checkpoint(tmp_path / "ckpt")
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "some words here"}\n')
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["eval", ckpt, "--perplexity", str(text), "--tasks", "zoo_mc", "--include-path",
                              write_tasks(tmp_path), "--no-progress", "--output", str(tmp_path / "r.json")])
    assert run_eval(args) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["perplexity"]["tokens"] > 0 and "zoo_mc" in saved["lm_eval"]
    assert run_eval(parser.parse_args(["eval", ckpt])) == 2
    assert "nothing to evaluate" in capsys.readouterr().out
