"""Every bad input gives one sentence naming the problem and the fix (issue 12, items 5 and 6).

CLI cases run ``zoo.cli.main`` and assert exit status 2, one ``error:`` line with the expected words, and no
traceback; Python API cases assert the exception type and its message.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import zoo
from zoo.cli import main
from zoo.models import ZooConfig, ZooForCausalLM

TINY_MODEL = {"vocab_size": 64, "d_model": 32, "n_layers": 2}
TINY_TRAIN = {"steps": 1, "device": "cpu"}


class Evil:
    """A pickle payload: loading it with weights_only=False would run print()."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def _yaml(tmp: Path, name: str, data) -> str:
    p = tmp / name
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def _cfg(**model) -> dict:
    return {"model": {**TINY_MODEL, **model}, "train": TINY_TRAIN}


# ----- fixtures: a tiny zoo checkpoint and a tiny transformers Mamba checkpoint -------------------------------------

@pytest.fixture(scope="module")
def zoo_ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("zoo") / "ckpt"
    torch.manual_seed(0)
    ZooForCausalLM(ZooConfig(**TINY_MODEL)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory) -> Path:
    from transformers import MambaConfig, MambaForCausalLM

    d = tmp_path_factory.mktemp("hf") / "mamba"
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)
    MambaForCausalLM(cfg).save_pretrained(d)
    return d


def _copy(src: Path, tmp: Path, name: str) -> Path:
    d = tmp / name
    shutil.copytree(src, d)
    return d


# Damage applied to a copy of a checkpoint folder (zoo or transformers Mamba alike).
def truncate_weights(d: Path) -> None:
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(100)


def random_weights(d: Path) -> None:
    (d / "model.safetensors").write_bytes(os.urandom(4096))


def config_list(d: Path) -> None:
    (d / "config.json").write_text("[1, 2, 3]")


def config_not_json(d: Path) -> None:
    (d / "config.json").write_text("{this is not json")


def only_pytorch_bin(d: Path) -> None:
    (d / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")


def no_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def pickle_bin(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))


def missing_weight(d: Path) -> None:
    sd = load_file(d / "model.safetensors")
    del sd["backbone.norm_f.weight"]
    save_file(sd, d / "model.safetensors")


def escaping_index(d: Path) -> None:
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    save_file(sd, d.parent / "outside.safetensors")  # exists: a join without a check would read it
    index = {"metadata": {}, "weight_map": {name: "../outside.safetensors" for name in sd}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


# ----- CLI cases ------------------------------------------------------------------------------------------------------
# (id, build argv from tmp + fixtures, words the error line must contain)

def _train(cfg_data, *overrides, name="c.yaml"):
    return lambda tmp, fx: ["train", _yaml(tmp, name, cfg_data), "--out", str(tmp / "run"), *overrides]


def _eval(damage):
    return lambda tmp, fx: ["eval", str(_copy(fx["zoo"], tmp, "ckpt") if damage is None else _damaged(fx["zoo"], tmp, damage))]


def _convert(damage):
    return lambda tmp, fx: ["convert", str(_damaged(fx["hf"], tmp, damage)), "--out", str(tmp / "converted")]


def _damaged(src: Path, tmp: Path, damage) -> Path:
    d = _copy(src, tmp, "src")
    damage(d)
    return d


def _resume_pickled_state(tmp, fx):
    from zoo.train.checkpoint import save_checkpoint

    run = zoo.load_config(_cfg())
    model = ZooForCausalLM(run.model)
    ckpt = save_checkpoint(tmp / "run" / "checkpoint-1", model, run_config=run.to_dict(), trainer_state={"step": 1})
    (ckpt / "trainer_state.pt").write_bytes(pickle.dumps(Evil()))
    return ["train", "--out", str(tmp / "run"), "--resume"]


def _finetune_offline(tmp, fx):
    base = tmp / "base"  # byte-tokenizer sized, so the data is the first thing that fails
    ZooForCausalLM(ZooConfig(**{**TINY_MODEL, "vocab_size": 260})).save_pretrained(base)
    return ["finetune", str(base), "--data", "someone/some-dataset", "--out", str(tmp / "ft")]


CLI_CASES = [
    ("mamba2-expand-0", _train(_cfg(pattern=["mamba2"], mixers={"mamba2": {"expand": 0}})),
     ["expand", "positive"]),
    ("huge-vocab", _train(_cfg(vocab_size=100_000_000_000)), ["parameters", "memory", "model.vocab_size"]),
    ("device-tpu9", _train(_cfg(), "train.device=tpu9"), ["train.device", "'tpu9'", "cuda"]),
    ("empty-config", _train("", name="empty.yaml"), ["empty.yaml is empty"]),
    ("binary-yaml", _train(bytes(range(256)) * 4, name="binary.yaml"), ["binary.yaml", "not a text YAML"]),
    ("override-no-key", _train(_cfg(), "=5"), ["'=5'", "empty key path", "key.path=value"]),
    ("empty-pattern", _train(_cfg(pattern=[])), ["model.pattern is empty", "at least one mixer"]),
    ("mixer-not-in-pattern", _train(_cfg(pattern=["attention"], mixers={"mamba": {"d_state": 8}})),
     ["model.mixers.mamba", "no layer uses", "remove them"]),
    ("n-layers-vs-layers", lambda tmp, fx: ["train", str(zoo.config.CONFIG_DIR / "jamba.yaml"), "--out",
                                            str(tmp / "run"), "model.n_layers=4"],
     ["model.n_layers=4", "lists 8 layers"]),
    ("eval-truncated-safetensors", _eval(truncate_weights), ["model.safetensors is damaged"]),
    ("eval-random-safetensors", _eval(random_weights), ["model.safetensors is damaged"]),
    ("eval-config-json-list", _eval(config_list), ["config.json holds a JSON list"]),
    ("eval-config-not-json", _eval(config_not_json), ["config.json is not valid JSON"]),
    ("eval-only-pytorch-bin", _eval(only_pytorch_bin), ["no model.safetensors weights", "pytorch_model.bin"]),
    ("eval-no-weights", _eval(no_weights), ["no model.safetensors weights"]),
    ("resume-pickled-trainer-state", _resume_pickled_state, ["trainer_state.pt is not a safe checkpoint"]),
    ("convert-truncated-safetensors", _convert(truncate_weights), ["model.safetensors is damaged"]),
    ("convert-random-safetensors", _convert(random_weights), ["model.safetensors is damaged"]),
    ("convert-config-json-list", _convert(config_list), ["config.json holds a JSON list"]),
    ("convert-config-not-json", _convert(config_not_json), ["config.json is not valid JSON"]),
    ("convert-pickled-bin", _convert(pickle_bin), ["pytorch_model.bin is not a safe checkpoint"]),
    ("convert-missing-weight", _convert(missing_weight), ["weight 'backbone.norm_f.weight' is missing"]),
    ("convert-index-escapes-folder", _convert(escaping_index), ["'../outside.safetensors'", "outside"]),
    ("finetune-hub-offline", _finetune_offline, ["'someone/some-dataset'", "HF_HUB_OFFLINE=1", "local"]),
]


@pytest.mark.parametrize("build, words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_sentence_with_exit_code_2(build, words, tmp_path, zoo_ckpt, hf_ckpt, capsys,
                                                       monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("ZOO_DEBUG", raising=False)
    argv = build(tmp_path, {"zoo": zoo_ckpt, "hf": hf_ckpt})
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in (err + out).splitlines() if ln.startswith("error: ")]
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    assert "unpickled!" not in out + err
    assert len(lines) == 1, (out, err)
    for w in words:
        assert w in lines[0], lines[0]
    assert not (tmp_path / "converted").exists()


def test_the_zoo_command_exits_2_without_a_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    env.pop("ZOO_DEBUG", None)
    cfg = _yaml(tmp_path, "c.yaml", _cfg())
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "train", cfg, "--out", str(tmp_path / "r"), "=5"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: override '=5'")


def test_finetune_help_says_data_may_come_from_the_hub(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Hugging Face Hub" in text and "HF_HUB_OFFLINE" in text


# ----- Python API forward ---------------------------------------------------------------------------------------------

def _model(mixer: str) -> ZooForCausalLM:
    torch.manual_seed(0)
    return ZooForCausalLM(ZooConfig(**TINY_MODEL, pattern=[mixer])).eval()


def _ids(*shape):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(0))


API_CASES = [
    ("ids-too-large", lambda m: m(torch.tensor([[1, 2, 64]])), ["input_ids", "vocabulary [0, 64)", "vocab_size"]),
    ("ids-negative", lambda m: m(torch.tensor([[1, -1, 2]])), ["input_ids", "-1", "vocabulary"]),
    ("ids-1d", lambda m: m(torch.tensor([1, 2, 3])), ["input_ids must be 2-D", "input_ids[None]"]),
    ("cu-seqlens-decreasing", lambda m: m(_ids(1, 8), cu_seqlens=torch.tensor([0, 5, 3, 8]), use_cache=False),
     ["cu_seqlens must rise"]),
    ("batch-size-0", lambda m: m(torch.zeros(0, 8, dtype=torch.long)), ["batch size 0"]),
    ("labels-outside-vocab", lambda m: m(_ids(1, 8), labels=torch.full((1, 8), 70)),
     ["labels", "vocabulary [0, 64)", "-100"]),
    ("labels-negative", lambda m: m(_ids(1, 8), labels=torch.tensor([[-100, -100, -5, 1, 2, 3, 4, 5]])),
     ["labels", "-5", "vocabulary"]),
]


@pytest.mark.parametrize("mixer", ["attention", "mamba", "s4"])
@pytest.mark.parametrize("call, words", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_forward_bad_input_names_the_problem(mixer, call, words):
    model = _model(mixer)
    with pytest.raises(ValueError) as info:
        call(model)
    msg = str(info.value)
    for w in words:
        assert w in msg, msg


def test_ignored_labels_and_valid_ids_still_work():
    model = _model("attention")
    ids = _ids(2, 8)
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1),
                                            ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)


def test_model_size_check_counts_parameters_and_names_the_setting():
    from zoo.config import ConfigError, check_model_size

    cfg = ZooConfig(**TINY_MODEL)
    n = check_model_size(cfg, memory=10**12)
    assert n == sum(p.numel() for p in ZooForCausalLM(cfg).parameters())
    with pytest.raises(ConfigError, match="model.d_model .* or n_layers"):
        check_model_size(cfg, memory=4 * n - 1)


def test_trainer_state_with_a_pickle_is_refused_by_name(tmp_path):
    from zoo.train.checkpoint import CheckpointError, load_trainer_state

    (tmp_path / "trainer_state.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="trainer_state.pt is not a safe checkpoint file"):
        load_trainer_state(tmp_path)
