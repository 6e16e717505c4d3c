"""`zoo train` with train.parallel.sequence: the same loss curve and weights as one process (gloo, CPU).

Each sequence of the MQAR batch is split over the ranks of a sequence group; with 4 processes and sequence 2 there
are also 2 data-parallel groups. 20 steps, metrics (loss, accuracy, gradient norm, eval) within 1e-5 of one process,
for minGRU (linear_scan), Mamba (LASP-2 states, the conv halo) and a Samba-like stack (+ sliding-window attention).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from sp_harness import run_ranks

import zoo
from zoo.train import read_jsonl, train

STEPS = 20


def _cfg(pattern: list[str], mixers: dict) -> dict:
    return {
        "model": {"vocab_size": 32, "d_model": 32, "n_layers": 2, "pattern": pattern, "mixers": mixers, "mlp": "swiglu",
                  "tie_word_embeddings": False},
        "train": {"steps": STEPS, "batch_size": 4, "grad_accum": 1, "lr": 3.0e-3, "warmup_steps": 2, "eval_every": 10,
                  "log_every": 1, "save_every": 0, "keep_checkpoints": 0, "progress": False, "device": "cpu",
                  "grad_clip": 0.5, "num_threads": 1},
        "task": {"name": "mqar", "seq_len": 16, "vocab_size": 32, "num_kv_pairs": 2, "num_train": 64, "num_test": 8},
    }


MODELS = {
    "mingru": _cfg(["mingru"], {}),
    "mamba": _cfg(["mamba"], {"mamba": {"d_state": 8}}),  # LASP-2 states + the conv halo
    "samba": _cfg(["mamba", "attention"], {"mamba": {"d_state": 8}, "attention": {"n_heads": 4, "window": 5}}),  # + window halo
}
LAUNCHES = [(2, 2), (4, 2)]  # (processes, sequence)


def _with(cfg: dict, **parallel) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["train"]["parallel"] = parallel
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp-train")
    for name, cfg in MODELS.items():
        train(zoo.load_config(cfg), root / f"{name}-single")
    for world, seq in LAUNCHES:
        jobs = [("sp_jobs_train:train_job", {"config": _with(cfg, data="ddp", sequence=seq),
                                             "out": str(root / f"{name}-w{world}-s{seq}")}) for name, cfg in MODELS.items()]
        run_ranks(jobs, world=world, tmp=root / f"logs-w{world}", timeout=300)
    return root


def _rows(path):
    rows = read_jsonl(path)
    for r in rows:
        r.pop("tokens_per_s", None)
        r.pop("world_size", None)
    return rows


@pytest.mark.parametrize("world,seq", LAUNCHES)
@pytest.mark.parametrize("name", list(MODELS))
def test_sequence_parallel_training_matches_one_process(runs, name, world, seq):
    one, many = _rows(runs / f"{name}-single" / "metrics.jsonl"), _rows(runs / f"{name}-w{world}-s{seq}" / "metrics.jsonl")
    assert len(many) == len(one) == STEPS + 2
    for a, b in zip(one, many):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a["step"])
    w1 = load_file(runs / f"{name}-single" / "final" / "model.safetensors")
    w2 = load_file(runs / f"{name}-w{world}-s{seq}" / "final" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)


def test_sequence_parallel_launch_is_validated():
    cfg = zoo.load_config(_with(MODELS["mingru"], sequence=2))
    with pytest.raises(ValueError, match="must divide the number of processes"):
        train(cfg, "/tmp/never-written")
