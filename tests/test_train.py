"""Training: schedule, weight-decay groups, accuracy, atomic checkpoints, exact resume and their errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import zoo
from zoo.data import multiquery_ar
from zoo.train import (
    CheckpointError,
    lr_factor,
    param_groups,
    read_jsonl,
    resolve_checkpoint,
    save_checkpoint,
    train,
)
from zoo.train.checkpoint import atomic_directory, latest_checkpoint, load_trainer_state
from zoo.train.loop import EpochSampler, _Window, evaluate, lm_step
from zoo.train.metrics import per_example_accuracy

TINY = {
    "model": {"vocab_size": 32, "d_model": 16, "n_layers": 2, "pattern": ["attention"],
              "mixers": {"attention": {"n_heads": 2}}, "mlp": "none"},
    "train": {"steps": 8, "batch_size": 8, "grad_accum": 2, "lr": 3.0e-3, "warmup_steps": 2, "eval_every": 4,
              "log_every": 2, "save_every": 3, "keep_checkpoints": 0, "progress": False},
    "task": {"name": "mqar", "seq_len": 16, "vocab_size": 32, "num_kv_pairs": 2, "num_train": 64, "num_test": 16},
}


def _curve(path):
    rows = read_jsonl(path)
    for r in rows:
        r.pop("tokens_per_s", None)
    return rows


# ----- schedule and optimizer ------------------------------------------------------------------------

def test_lr_schedule_warmup_then_cosine_to_min():
    f = [lr_factor(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for s in range(115)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))  # linear warmup rises
    assert all(a >= b for a, b in zip(f[10:110], f[11:110]))  # cosine decays
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert f[110] == pytest.approx(0.1) and f[114] == pytest.approx(0.1)  # stays at the floor
    assert lr_factor(0, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == pytest.approx(1.0)


def test_no_weight_decay_on_norms_biases_and_declared_parameters():
    class M(nn.Module):
        no_weight_decay = ("A_log",)  # declared on the class, so a rebuilt (from_pretrained) model keeps it

        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.lin = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.A_log = nn.Parameter(torch.zeros(4, 3))
            self.W = nn.Parameter(torch.zeros(4, 3))

    m = M()
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(decay) == {id(m.embed.weight), id(m.lin.weight), id(m.W)}
    assert ids(no_decay) == {id(m.lin.bias), id(m.norm.weight), id(m.norm.bias), id(m.A_log)}


@pytest.mark.parametrize("name, exempt", [("mamba", "mixer.A_log"), ("s4", "mixer.B"), ("s4", "mixer.A_imag"),
                                          ("hgrn", "hgrn.gamma"), ("mom", "mixer.A_log")])
def test_declared_no_decay_matrices_survive_save_and_load(name, exempt, tmp_path):
    from zoo.train.optim import no_decay_names

    model = zoo.build_model({"model": {"vocab_size": 32, "d_model": 16, "n_layers": 2, "pattern": [name]}})
    fresh = no_decay_names(model)
    assert any(n.endswith(exempt) for n in fresh), sorted(fresh)
    model.save_pretrained(tmp_path)
    assert no_decay_names(zoo.ZooForCausalLM.from_pretrained(tmp_path)) == fresh


def test_epoch_sampler_resumes_in_place():
    a = EpochSampler(10, 4, seed=1)
    seq = [a.next() for _ in range(5)]
    b = EpochSampler(10, 4, seed=1)
    for _ in range(3):
        b.next()
    c = EpochSampler(10, 4, seed=1)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(seq[3:], [c.next(), c.next()]))
    assert len(torch.cat(seq[:2]).unique()) == 8  # no repeats within an epoch


def test_sampler_smaller_dataset_than_batch_is_clear():
    with pytest.raises(ValueError, match=r"train\.batch_size"):
        EpochSampler(4, 8, seed=0)


# ----- metrics ---------------------------------------------------------------------------------------

def test_accuracy_is_mean_over_queries_then_examples():
    targets = torch.tensor([[-100, 5, 6, 7], [-100, -100, -100, 9], [-100] * 4])
    preds = torch.tensor([[0, 5, 0, 0], [0, 0, 0, 9], [0] * 4])
    acc = per_example_accuracy(preds, targets)
    assert acc.tolist() == pytest.approx([1 / 3, 1.0])  # the unlabelled example is dropped
    assert float(acc.mean()) == pytest.approx(2 / 3)  # not the token mean (2/4)


def test_sparse_loss_equals_model_loss():
    torch.manual_seed(0)
    model = zoo.build_model(TINY)
    data = multiquery_ar(4, vocab_size=32, seq_len=16, num_kv_pairs=2, seed=0)
    x, y = data.input_ids, data.labels
    ref = model(input_ids=x, labels=y).loss
    for sparse in (True, False):
        loss, aux, preds, tgt, mask = lm_step(model, x, y, sparse)
        assert torch.allclose(loss, ref, atol=1e-6) and aux is None
        assert preds.shape == tgt.shape == (int(mask.sum()),)


def test_aux_loss_is_reported_when_present():
    torch.manual_seed(0)
    model = zoo.build_model(TINY).train()
    layer = model.model.layers[0]
    layer.register_forward_hook(lambda m, i, o: setattr(m, "aux_loss", 0.01 * o.pow(2).mean()))
    data = multiquery_ar(4, vocab_size=32, seq_len=16, num_kv_pairs=2, seed=0)
    loss, aux, preds, tgt, _ = lm_step(model, data.input_ids, data.labels, True)
    assert aux is not None and float(aux.detach()) > 0
    full = model(input_ids=data.input_ids, labels=data.labels).loss
    assert torch.allclose(loss + aux, full, atol=1e-6)
    w = _Window()
    w.add(loss, aux, preds, tgt, data.input_ids.numel())
    assert w.row(1, 1e-3, 0.5)["train/aux_loss"] == pytest.approx(float(aux.detach()))


def test_evaluate_perfect_predictor_scores_one():
    class Oracle(nn.Module):
        """Predicts each next label exactly (logits one-hot on the target)."""

        def __init__(self, labels):
            super().__init__()
            self.labels = labels

        def forward(self, input_ids):
            nxt = torch.nn.functional.pad(self.labels[:, 1:], (0, 1), value=0).clamp(min=0)
            return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, 32).float() * 30})()

    data = multiquery_ar(8, vocab_size=32, seq_len=16, num_kv_pairs=2, seed=0)
    res = evaluate(Oracle(data.labels), data, batch_size=8)
    assert res["accuracy"] == 1.0 and res["examples"] == 8 and res["loss"] < 1e-3


# ----- checkpoints -----------------------------------------------------------------------------------

def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    model = zoo.build_model(TINY)
    path = save_checkpoint(tmp_path / "final", model, run_config=TINY, trainer_state={"step": 1})
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    class Broken:
        def save_pretrained(self, d):
            (d / "model.safetensors").write_bytes(b"partial")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "final", Broken(), run_config=TINY)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no temporary directory left behind
    assert load_trainer_state(path)["step"] == 1


def test_atomic_directory_replaces_existing(tmp_path):
    atomic_directory(tmp_path / "d", lambda d: (d / "a").write_text("1"))
    atomic_directory(tmp_path / "d", lambda d: (d / "b").write_text("2"))
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_not_a_zoo_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"is not a zoo checkpoint .*model_type 'zoo'.*zoo train --out"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is not a zoo checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")


# ----- the loop --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, train(TINY, out)


def test_train_writes_metrics_curves_and_loadable_checkpoint(full_run):
    out, result = full_run
    assert result.step == 8 and result.checkpoint == out / "final"
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6, 8]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [4, 8]
    assert all(math.isfinite(r["train/loss"]) and r["tokens_per_s"] > 0 for r in rows if "train/loss" in r)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    for name in ("config.json", "model.safetensors", "zoo_run.yaml", "trainer_state.pt"):
        assert (out / "final" / name).is_file()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert isinstance(model, zoo.ZooForCausalLM)
    assert result.eval_accuracy == rows[-1]["eval/accuracy"]
    assert latest_checkpoint(out) == out / "final"


def test_resume_gives_the_same_loss_curve(full_run, tmp_path):
    out, _ = full_run
    stopped = train(TINY, tmp_path, stop_after=5)  # "interrupted" after step 5; last checkpoint at step 3
    assert stopped.step == 5 and stopped.checkpoint == tmp_path / "checkpoint-3"
    resumed = train(TINY, tmp_path, resume=True)
    assert resumed.step == 8
    assert _curve(tmp_path / "metrics.jsonl") == _curve(out / "metrics.jsonl")
    a = zoo.ZooForCausalLM.from_pretrained(out / "final").state_dict()
    b = zoo.ZooForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_different_config_names_the_keys(full_run, tmp_path):
    out, _ = full_run
    other = json.loads(json.dumps(TINY))
    other["model"]["d_model"] = 32
    other["task"]["num_kv_pairs"] = 3
    with pytest.raises(CheckpointError, match=r"model\.d_model.*task\.num_kv_pairs"):
        train(other, tmp_path, resume=out / "checkpoint-6")


def test_resume_without_checkpoint_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        train(TINY, tmp_path, resume=True)


def test_existing_run_is_not_overwritten_silently(full_run, tmp_path):
    out, _ = full_run
    with pytest.raises(CheckpointError, match="--resume.*--overwrite"):
        train(TINY, out)
    assert (out / "final" / "model.safetensors").is_file()


def test_model_vocab_smaller_than_task_is_clear(tmp_path):
    bad = json.loads(json.dumps(TINY))
    bad["task"]["vocab_size"] = 64
    with pytest.raises(ValueError, match=r"model\.vocab_size"):
        train(bad, tmp_path)
