"""Exact resume for every registered mixer and the hybrid configs; what ``--resume`` refuses; stale temp dirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import small_kwargs

import zoo
from zoo.cli import main
from zoo.train import CheckpointError, load_trainer_state, read_jsonl, train
from zoo.train.config import RESUME_SAFE_KEYS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
N = 4  # steps; the resumed run stops after N // 2 and continues from checkpoint-(N // 2)
TRAIN = {"steps": N, "batch_size": 4, "lr": 3.0e-3, "warmup_steps": 1, "weight_decay": 0.1, "eval_every": 0,
         "eval_batches": 1, "log_every": 1, "save_every": N // 2, "keep_checkpoints": 0, "progress": False}
TASK = {"name": "mqar", "seq_len": 16, "vocab_size": 32, "num_kv_pairs": 2, "num_train": 32, "num_test": 4}


def mixer_run(name: str) -> dict:
    kwargs = small_kwargs(name, **({"d_state": 8, "headdim": 16} if name == "hydra" else {}))  # hydra: smaller still
    return {"model": {"vocab_size": 32, "d_model": 32, "n_layers": 2, "pattern": [name], "mixers": {name: kwargs},
                      "mlp": "swiglu"}, "train": TRAIN, "task": TASK}


def hybrid_run(name: str) -> list:
    """configs/<name>.yaml shrunk to 2 layers at d_model 32 (Jamba keeps a Mamba + MoE layer and an attention one)."""
    small: dict = {"model": {"vocab_size": 32, "d_model": 32}, "train": TRAIN, "task": TASK}
    if name == "jamba":
        small["model"]["layers"] = [{"mixer": "mamba", "mlp": "moe"}, {"mixer": "attention", "mlp": "swiglu"}]
        small["model"]["mixers"] = {"mamba": {"d_state": 8}, "attention": {"n_heads": 2, "n_kv_heads": 1}}
    else:
        small["model"].update(n_layers=2, mixers={"mamba": {"d_state": 8}, "attention": {"n_heads": 2, "window": 8}})
    return [str(CONFIGS / f"{name}.yaml"), small]


CASES = {name: mixer_run(name) for name in zoo.list_mixers()} | {h: hybrid_run(h) for h in ("samba", "jamba")}


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    """curves.png is no part of the resume state and costs ~1 s per checkpoint; skip drawing it here."""
    monkeypatch.setattr("zoo.train.loop.plot_curves", lambda *a, **k: None)


def _rows(out: Path) -> list[dict]:
    rows = read_jsonl(out / "metrics.jsonl")
    for r in rows:
        r.pop("tokens_per_s", None)
    return rows


def _assert_same(a, b, where: str) -> None:
    """Bitwise equality of nested trainer states (tensors with torch.equal, the rest with ==)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _state(out: Path) -> dict:
    state = load_trainer_state(out / "final")
    for row in state["history"]:
        row.pop("tokens_per_s", None)
    return state


@pytest.mark.parametrize("name", list(CASES))
def test_stop_and_resume_is_bitwise_the_straight_run(name, tmp_path):
    run = zoo.load_config(CASES[name])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(run, straight)
    stopped = train(run, resumed, stop_after=N // 2)
    assert stopped.step == N // 2 and stopped.checkpoint == resumed / f"checkpoint-{N // 2}"
    assert train(run, resumed, resume=True).step == N
    assert _rows(resumed) == _rows(straight)  # losses, lr, grad norms, eval
    a = zoo.ZooForCausalLM.from_pretrained(straight / "final").state_dict()
    b = zoo.ZooForCausalLM.from_pretrained(resumed / "final").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = _state(straight), _state(resumed)
    assert len(sa["optimizer"]["param_groups"]) == 2  # decayed and exempt
    _assert_same(sa, sb, "trainer_state")  # optimizer (groups and moments), scheduler, data position, RNG, history


# ----- a changed train section -----------------------------------------------------------------------

ATTN = mixer_run("attention")


@pytest.fixture(scope="module")
def attn_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("attn") / "out"
    train(zoo.load_config(ATTN), out, stop_after=N // 2)
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def test_resume_refuses_a_changed_train_section(attn_run, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(ATTN))
    code = main(["train", str(cfg), "--out", str(attn_run), "--resume", "train.batch_size=8", "train.lr=1e-2"])
    assert code == 2
    line = _error_line(capsys)
    assert "train.batch_size" in line and "train.lr" in line and "train.steps" in line  # changed keys + what may change
    assert "cannot resume" in line
    with pytest.raises(CheckpointError, match=r"train\.grad_accum"):
        train(zoo.load_config(ATTN, ["train.grad_accum=2"]), attn_run, resume=True)
    assert sorted(p.name for p in attn_run.glob("checkpoint-*")) == [f"checkpoint-{N // 2}"]  # nothing written


def test_resume_accepts_the_keys_declared_safe(attn_run, tmp_path):
    assert {"steps", "eval_every", "log_every", "save_every"} <= set(RESUME_SAFE_KEYS)
    out = tmp_path / "out"
    run = zoo.load_config(ATTN, ["train.steps=6", "train.log_every=2", "train.save_every=3", "train.eval_every=3",
                                 "train.keep_checkpoints=1", "train.progress=true"])
    assert ATTN["train"] == TRAIN and TRAIN["steps"] == N  # load_config's overrides left the dicts alone
    result = train(run, out, resume=attn_run / f"checkpoint-{N // 2}")
    assert result.step == 6
    assert (out / "final" / "trainer_state.pt").is_file()


# ----- stale temporary checkpoint directories --------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this id now (a reuse within the test is vanishingly unlikely)


@pytest.mark.parametrize("resume", [False, True])
def test_stale_temporary_checkpoints_are_removed_live_ones_kept(resume, attn_run, tmp_path):
    out = tmp_path / "out"
    if resume:
        train(zoo.load_config(ATTN), out, stop_after=N // 2)
    out.mkdir(exist_ok=True)
    dead, live = _dead_pid(), os.getppid()  # the parent (pytest's shell or runner) is alive for the whole test
    stale = [out / f".checkpoint-2.tmp-{dead}", out / f".final.tmp-{dead}"]
    alive = [out / f".checkpoint-3.tmp-{live}", out / f".final.tmp-{live}"]
    other = [out / "notes.tmp-1", out / f".cache.tmp-{dead}"]  # not ours: never touched
    for d in stale + alive + other:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    train(zoo.load_config(ATTN), out, resume=resume)
    assert not any(d.exists() for d in stale)
    assert all(d.is_dir() for d in alive + other)
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "zoo"
