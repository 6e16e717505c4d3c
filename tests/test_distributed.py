"""Data-parallel training on 2 CPU processes (gloo): DDP and FSDP2 reach the 1-process losses and weights.

The test launches the two ranks itself as subprocesses with the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT), so ``zoo train`` joins the group exactly as under torchrun.
All jobs run in one pair of processes (one import of torch), bounded by a timeout.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import zoo
from zoo.train import CheckpointError, read_jsonl, train

STEPS = 20


def _cfg(pattern: list[str], mixers: dict, mlp: str = "none") -> dict:
    return {
        "model": {"vocab_size": 32, "d_model": 32, "n_layers": 2, "pattern": pattern, "mixers": mixers, "mlp": mlp,
                  "tie_word_embeddings": False},
        # grad_accum 2 exercises no_sync; grad_clip 0.5 is below the norms seen, so the global norm matters
        "train": {"steps": STEPS, "batch_size": 4, "grad_accum": 2, "lr": 3.0e-3, "warmup_steps": 2, "eval_every": 10,
                  "log_every": 1, "save_every": 10, "keep_checkpoints": 0, "progress": False, "device": "cpu",
                  "grad_clip": 0.5, "num_threads": 1},
        "task": {"name": "mqar", "seq_len": 16, "vocab_size": 32, "num_kv_pairs": 2, "num_train": 64, "num_test": 8},
    }


MODELS = {
    "mamba": _cfg(["mamba"], {"mamba": {"d_state": 8}}),  # SSM
    "retnet": _cfg(["retnet"], {"retnet": {"n_heads": 2}}),  # linear attention
    "samba": _cfg(["mamba", "attention"], {"mamba": {"d_state": 8}, "attention": {"n_heads": 2, "window": 8}},
                  mlp="swiglu"),  # hybrid
}
MODES = ("ddp", "fsdp")

_JOB = textwrap.dedent("""
    import json, os, sys
    import zoo
    from zoo.train import train
    for job in json.loads(sys.argv[1]):
        os.environ["MASTER_PORT"] = str(job["port"])
        if "finetune" in job:
            from zoo.finetune import finetune
            finetune(**job["finetune"])
        else:
            train(zoo.load_config(job["config"]), job["out"], **job["kw"])
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with(cfg: dict, **parallel) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["train"]["parallel"] = parallel
    return cfg


def _launch(jobs: list[dict], tmp, world: int = 2, timeout: float = 240) -> None:
    script = tmp / "job.py"
    script.write_text(_JOB)
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
        log = open(tmp / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(script), json.dumps(jobs)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        logs = "\n".join((tmp / f"rank{r}.log").read_text()[-3000:] for r in range(world))
        pytest.fail(f"distributed jobs failed with exit codes {codes}:\n{logs}")


def _weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()  # a plain single-process load


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every 2-process job in one launch, plus the 1-process references."""
    tmp = tmp_path_factory.mktemp("dist")
    jobs = []
    for name, cfg in MODELS.items():
        for mode in MODES:
            jobs.append({"config": _with(cfg, data=mode), "out": str(tmp / f"{name}-{mode}"), "port": _free_port(),
                         "kw": {}})
    # FSDP2 resume: stop after the step-10 checkpoint, then continue with the same world size
    for kw in ({"stop_after": 10}, {"resume": True}):
        jobs.append({"config": _with(MODELS["samba"], data="fsdp"), "out": str(tmp / "samba-fsdp-resumed"),
                     "port": _free_port(), "kw": kw})
    _launch(jobs, tmp)
    for name, cfg in MODELS.items():
        train(zoo.load_config(cfg), tmp / f"{name}-single")
    return tmp


def _rows(path):
    rows = read_jsonl(path)
    for r in rows:
        r.pop("tokens_per_s", None)
    return rows


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_two_processes_match_one(runs, name, mode):
    one, two = _rows(runs / f"{name}-single" / "metrics.jsonl"), _rows(runs / f"{name}-{mode}" / "metrics.jsonl")
    # rank 0 alone wrote: one row per step and per eval, not two
    assert len(two) == len(one) == STEPS + 2
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            if key == "world_size":
                assert (a[key], b[key]) == (1, 2)
            elif key in ("step", "tokens"):
                assert a[key] == b[key]
            else:
                # the loss curve to 1e-5; the gradient norm (a sum of squares over every parameter, reduced in a
                # different order by DDP / FSDP2) drifts more over 20 Adam steps: measured after the tiled loss's
                # in-place softmax (d8a7ed1) changed its rounding, retnet under FSDP2 spikes to 2.4e-4 at step 19
                # (1e-7 to 3e-5 at the other steps, the losses within 4e-7 throughout), hence 5e-4
                rel = 5e-4 if key == "grad_norm" else 1e-5
                assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-6), (key, a["step"])
    assert two[-2]["tokens"] == STEPS * 2 * 4 * 16  # global tokens seen (the last row is the eval)
    w1, w2 = _weights(runs / f"{name}-single" / "final"), _weights(runs / f"{name}-{mode}" / "final")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)
    assert (runs / f"{name}-{mode}" / "final" / "config.json").is_file()
    assert (runs / f"{name}-{mode}" / "checkpoint-10" / "config.json").is_file()
    assert not list(runs.glob(f"{name}-{mode}/.*tmp*"))  # no half-written checkpoint left by another rank


def test_fsdp_resume_is_exact_and_other_world_size_is_refused(runs):
    full, resumed = runs / "samba-fsdp", runs / "samba-fsdp-resumed"
    w_full, w_res = _weights(full / "final"), _weights(resumed / "final")
    for k in w_full:
        assert torch.equal(w_res[k], w_full[k]), k
    assert _rows(resumed / "metrics.jsonl") == _rows(full / "metrics.jsonl")
    with pytest.raises(CheckpointError, match="2 process"):
        train(zoo.load_config(_with(MODELS["samba"], data="fsdp")), resumed, resume=True)


def test_parallel_config_is_validated():
    with pytest.raises(zoo.ConfigError, match="positive integer"):
        zoo.load_config(copy.deepcopy(MODELS["mamba"]), overrides=["train.parallel.sequence=0"])
    with pytest.raises(zoo.ConfigError, match="none, ddp, fsdp"):
        zoo.load_config(copy.deepcopy(MODELS["mamba"]), overrides=["train.parallel.data=zero3"])
    assert zoo.load_config(copy.deepcopy(MODELS["mamba"])).train.parallel == {"data": None, "sequence": 1}


def test_finetune_under_two_processes_writes_final_once(tmp_path):
    """`zoo finetune` (HF Trainer, DDP through accelerate): rank 0 alone writes final/, config.json included."""
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    cfg = zoo.ZooConfig(vocab_size=260, d_model=32, n_layers=2, pattern=["mamba", "attention"],
                        mixers={"attention": {"n_heads": 2}, "mamba": {"d_state": 8}})
    zoo.ZooForCausalLM(cfg).save_pretrained(tmp_path / "base")
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"text": "ab cd ef " * (1 + i % 3)}) + "\n")
    out = tmp_path / "out"
    job = {"model": str(tmp_path / "base"), "data": str(tmp_path / "d.jsonl"), "out": str(out), "max_steps": 2,
           "batch_size": 2, "seq_len": 32, "progress": False, "logging_steps": 1}
    _launch([{"finetune": job, "port": _free_port()}], tmp_path)
    final = out / "final"
    assert (final / "config.json").is_file() and (final / "finetune_config.json").is_file()
    assert json.loads((out / "finetune_metrics.json").read_text())["steps"] == 2
    assert not list(out.glob(".final*"))  # no temporary folder left behind by a second writer
    model = ft_load(final)
    assert isinstance(model, zoo.ZooForCausalLM)


def ft_load(path):
    from zoo.finetune import load_finetuned

    return load_finetuned(path)


def test_single_process_resume_keeps_no_weight_decay(runs, tmp_path):
    """A resumed mamba run (rebuilt by from_pretrained) must not start decaying A_log: bitwise the straight run."""
    cfg = MODELS["mamba"]
    train(zoo.load_config(copy.deepcopy(cfg)), tmp_path / "r", stop_after=10)
    train(zoo.load_config(copy.deepcopy(cfg)), tmp_path / "r", resume=True)
    w_full, w_res = _weights(runs / "mamba-single" / "final"), _weights(tmp_path / "r" / "final")
    for k in w_full:
        assert torch.equal(w_res[k], w_full[k]), k


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="needs the optional accelerate package")
def test_accelerate_launch_runs_data_parallel(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (torchrun underneath; gloo on CPU) is a 2-process DDP run."""
    import shutil

    import yaml

    exe = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert exe is not None, "accelerate is installed but its `accelerate` command is not on PATH"

    cfg = copy.deepcopy(MODELS["mamba"])
    cfg["train"].update(steps=4, eval_every=0, save_every=0, grad_accum=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_ip",
           "127.0.0.1", "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "zoo.cli", "train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "acc")]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(zoo.load_config(cfg), tmp_path / "one")
    many, one = _rows(tmp_path / "acc" / "metrics.jsonl"), _rows(tmp_path / "one" / "metrics.jsonl")
    assert [r["world_size"] for r in read_jsonl(tmp_path / "acc" / "metrics.jsonl") if "train/loss" in r] == [2] * 4
    assert len(many) == len(one)
    for a, b in zip(one, many):
        assert b.get("train/loss", b.get("eval/loss")) == pytest.approx(a.get("train/loss", a.get("eval/loss")), rel=1e-5), a["step"]
