"""The ``zoo`` command line: list, train, eval, generate, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zoo.cli import COMMANDS, main

TINY = {
    "model": {"vocab_size": 32, "d_model": 16, "n_layers": 2, "pattern": ["attention"],
              "mixers": {"attention": {"n_heads": 2}}, "mlp": "none"},
    "train": {"steps": 6, "batch_size": 8, "warmup_steps": 1, "eval_every": 3, "log_every": 2, "progress": False},
    "task": {"name": "mqar", "seq_len": 16, "vocab_size": 32, "num_kv_pairs": 2, "num_train": 64, "num_test": 16},
}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


@pytest.fixture(scope="module")
def trained(tiny_yaml, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    code = main(["train", str(tiny_yaml), "--out", str(out), "train.steps=4", "train.lr=2e-3"])
    assert code == 0
    return out


def test_commands_are_registered():
    assert {"list", "train", "eval", "generate"} <= set(COMMANDS)


def test_zoo_list_shows_attention(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "causal" in out.splitlines()[0]


def test_zoo_train_writes_metrics_curves_and_a_loadable_checkpoint(trained, capsys):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 4  # the override train.steps=4 won over the YAML's 6
    saved = yaml.safe_load((trained / "final" / "zoo_run.yaml").read_text())
    assert saved["train"]["lr"] == 2e-3 and saved["train"]["steps"] == 4
    assert (trained / "curves.png").is_file()
    from transformers import AutoModelForCausalLM

    import zoo  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(trained / "final")
    assert model.config.model_type == "zoo"


def test_zoo_train_prints_accuracy_and_how_to_load(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", str(tiny_yaml), "--out", str(out), "train.steps=2"]) == 0
    text = capsys.readouterr().out
    final = (out / "final").resolve()
    assert "final eval accuracy" in text and f"checkpoint: {final}" in text
    assert "import zoo; from transformers import AutoModelForCausalLM" in text
    assert f'model = AutoModelForCausalLM.from_pretrained("{final}")' in text


def test_zoo_train_task_option_and_resume(tiny_yaml, tmp_path, capsys):
    task = tmp_path / "task.yaml"
    task.write_text(yaml.safe_dump({"task": {"num_kv_pairs": 3}}))
    out = tmp_path / "o"
    assert main(["train", str(tiny_yaml), "--task", str(task), "--out", str(out), "train.save_every=2"]) == 0
    assert yaml.safe_load((out / "final" / "zoo_run.yaml").read_text())["task"]["num_kv_pairs"] == 3
    capsys.readouterr()
    assert main(["train", str(tiny_yaml), "--out", str(out)]) == 2  # an existing run needs --resume/--overwrite
    assert "--resume" in _error_line(capsys)
    assert main(["train", "--out", str(out), "--resume"]) == 0  # config taken from the checkpoint
    assert main(["train", "--out", str(out), "--resume", "train.log_every=1"]) == 0  # override, not a path
    assert main(["train", str(tiny_yaml), "--out", str(out), "--overwrite", "train.steps=2"]) == 0


def test_zoo_train_resume_with_other_config_is_one_line(tiny_yaml, trained, tmp_path, capsys):
    code = main(["train", str(tiny_yaml), "--out", str(tmp_path / "x"), f"--resume={trained / 'final'}",
                 "model.d_model=32"])
    assert code == 2
    assert "model.d_model" in _error_line(capsys)


def test_zoo_eval_reports_accuracy(trained, capsys):
    assert main(["eval", str(trained), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == "mqar" and 0.0 <= res["accuracy"] <= 1.0 and res["examples"] == 16
    assert main(["eval", str(trained / "final"), "task.num_test=8"]) == 0
    assert "(8 examples)" in capsys.readouterr().out


def test_zoo_generate_ids_and_prompt(trained, capsys):
    assert main(["generate", str(trained), "--ids", "1 2 3", "--max-new-tokens", "3"]) == 0
    ids = capsys.readouterr().out.split()
    assert ids[:3] == ["1", "2", "3"] and len(ids) == 6
    assert main(["generate", str(trained), "--prompt", "hi"]) == 2  # byte tokenizer needs vocab >= 259
    assert "--ids" in _error_line(capsys)


def test_zoo_generate_compile_gives_the_same_tokens(trained, capsys, monkeypatch):
    """--compile runs the decode steps through compile_decode() (the steps' logits are checked against the eager
    ones in test_decode_step.py) and prints the same greedy continuation."""
    from zoo.models.modeling import ZooForCausalLM

    assert main(["generate", str(trained), "--ids", "1 2 3", "--max-new-tokens", "4"]) == 0
    eager = capsys.readouterr().out.split()
    steps = []
    real = ZooForCausalLM._compiled_step

    def spy(self, *a):
        step = real(self, *a)
        steps.append(step is not None)
        return step

    monkeypatch.setattr(ZooForCausalLM, "_compiled_step", spy)
    assert main(["generate", str(trained), "--ids", "1 2 3", "--max-new-tokens", "4", "--compile"]) == 0
    assert capsys.readouterr().out.split() == eager
    assert steps.count(True) == 3  # every step after the prompt's (4 new tokens: the first comes from the prefill)


def test_zoo_generate_text_with_byte_tokenizer(tmp_path, capsys):
    import zoo

    cfg = json.loads(json.dumps(TINY))
    cfg["model"]["vocab_size"] = 259
    model = zoo.build_model(cfg)
    model.save_pretrained(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "4", "--do-sample",
                 "--top-k", "5"]) == 0
    assert capsys.readouterr().out.startswith("ab")


@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "not found"),
        ("model: {d_model: 16\ntrain: [", "YAML syntax error"),
        ("model: {d_modle: 16}\n", "Did you mean 'd_model'"),
        ("train: {steps: many}\n", "train.steps"),
        ("task: {name: mqqar}\n", "task.name"),
        ("model: {pattern: [atention]}\n", "attention"),
        ("model: {d_model: 30, mixers: {attention: {n_heads: 4}}}\n", "n_heads"),
        ("train: {log_every: 0}\n", "train.log_every"),
        ("task: {seq_len: 63}\n", "task.seq_len"),
        ("task: {name: text}\n", "task.path"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, capsys, content, needle):
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    code = main(["train", str(path), "--out", str(tmp_path / "o")])
    assert code == 2
    assert needle in _error_line(capsys)


def test_bad_override_and_checkpoint_exit_2(tiny_yaml, tmp_path, capsys):
    assert main(["train", str(tiny_yaml), "--out", str(tmp_path / "o"), "train.lrr=1"]) == 2
    assert "train.lrr" in _error_line(capsys)
    assert main(["eval", str(tmp_path)]) == 2
    assert "is not a zoo checkpoint" in _error_line(capsys)
    assert main(["generate", str(tmp_path / "nowhere"), "--ids", "1"]) == 2
    assert "does not exist" in _error_line(capsys)


def test_console_entry_point_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "zoo.cli", "train", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.yaml" in lines[0]


def test_zoo_train_on_text_then_generate_with_its_tokenizer(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("".join(f"line {i}: hello zoo, hello world.\n" for i in range(60)))
    cfg = json.loads(json.dumps(TINY))
    cfg["model"]["vocab_size"] = 259
    cfg["task"] = {"name": "text", "path": str(data), "seq_len": 32}
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "o"
    assert main(["train", str(path), "--out", str(out), "train.steps=3"]) == 0
    assert (out / "final" / "tokenizer_config.json").is_file()
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "hello", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("hello")


def test_task_names_resolve_to_configs_tasks():
    from zoo.config import task_path

    assert task_path("mqar").endswith("configs/tasks/mqar.yaml")
    assert task_path("no/such.yaml") == "no/such.yaml"


def test_help_lists_every_command(capsys):
    assert main([]) == 2
    text = capsys.readouterr().out
    for name in ("list", "train", "eval", "generate", "convert", "finetune", "sweep"):
        assert f"    {name}" in text


def test_zoo_convert_bad_source_is_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in _error_line(capsys)


def test_zoo_eval_perplexity_on_a_local_file(trained, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("abc\n")
    # the tiny model's vocab (32) cannot hold the byte tokenizer: a one-line error, not a traceback
    code = main(["eval", str(trained), "--perplexity", str(text), "--no-progress"])
    out = capsys.readouterr()
    assert code == 2 and "Traceback" not in out.err + out.out
