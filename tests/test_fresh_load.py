"""A saved zoo checkpoint loads in a fresh Python process that never imports ``zoo`` itself.

``save_pretrained`` (model, config, tokenizer; so also the trainer's checkpoints and ``zoo convert``) writes
``auto_map`` and ``zoo_hf.py``; transformers' ``trust_remote_code`` path then imports the installed seq-zoo. Where
seq-zoo is not installed, loading fails with one sentence naming ``pip install seq-zoo``. Nothing is unpickled.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from zoo.data.tokenizer import ByteTokenizer
from zoo.models import ZooConfig, ZooForCausalLM, ZooForSequenceClassification
from zoo.train.checkpoint import save_checkpoint

TEXT = "hello, fresh process"

# Runs in the child. It never imports zoo; it forbids unpickling; it prints nothing but what the parent reads.
CHILD = r"""
import pickle, sys
import torch

def refuse(*args, **kwargs):
    raise AssertionError("loading a zoo checkpoint unpickled something")

torch.load = pickle.load = pickle.loads = refuse
assert "zoo" not in sys.modules
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

lm_dir, cls_dir, tok_dir, out, text = sys.argv[1:6]
alone = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=True)  # a folder with only the tokenizer
tok = AutoTokenizer.from_pretrained(lm_dir, trust_remote_code=True)
ids = tok(text, return_tensors="pt")["input_ids"]
assert alone(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
lm = AutoModelForCausalLM.from_pretrained(lm_dir, trust_remote_code=True).eval()
clf = AutoModelForSequenceClassification.from_pretrained(cls_dir, trust_remote_code=True).eval()
with torch.no_grad():
    tensors = {
        "ids": ids,
        "lm": lm(ids).logits,
        "generated": lm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id),
        "clf": clf(ids).logits,
    }
save_file(tensors, out)
print(type(alone).__module__, type(tok).__module__, type(lm).__module__, type(clf).__module__, sep="\n")
"""

# Makes ``import zoo`` fail as it does where seq-zoo is not installed.
BLOCK_ZOO = r"""
class _NoZoo:
    def find_spec(self, name, path=None, target=None):
        if name == "zoo" or name.startswith("zoo."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, _NoZoo())
"""


# Runs in the child after BLOCK_ZOO: every loader must fail with an ImportError whose message is printed.
BLOCKED_CHILD = r"""
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

loaders = (AutoTokenizer, AutoModelForCausalLM, AutoModelForSequenceClassification)
for auto, path in zip(loaders, sys.argv[1:4]):
    try:
        auto.from_pretrained(path, trust_remote_code=True)
    except ImportError as e:
        print(str(e))
    else:
        print("loaded without seq-zoo?")
"""


def tiny(**extra) -> ZooConfig:
    return ZooConfig(vocab_size=259, d_model=32, n_layers=2, pattern=["mamba", "attention"],
                     mixers={"mamba": {"d_state": 8}, "attention": {"n_heads": 4}}, tie_word_embeddings=False, **extra)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh")
    torch.manual_seed(0)
    lm = ZooForCausalLM(tiny()).eval()
    clf = ZooForSequenceClassification(tiny(num_labels=3)).eval()
    tok = ByteTokenizer()
    lm_dir = save_checkpoint(root / "run" / "final", lm, tokenizer=tok, trainer_state={"step": torch.tensor(3)})
    clf.save_pretrained(root / "clf")
    tok.save_pretrained(root / "tok")
    return root, lm, clf, tok, lm_dir, root / "clf"


def run_child(root, lm_dir, cls_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(root / "hf_home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    code = CHILD
    return subprocess.run(
        [sys.executable, "-c", code, str(lm_dir), str(cls_dir), str(root / "tok"), str(root / "out.safetensors"), TEXT],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )


def test_save_pretrained_writes_auto_map_and_code_file(saved):
    _, _, _, _, lm_dir, cls_dir = saved
    for d in (lm_dir, cls_dir):
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["auto_map"]["AutoModelForCausalLM"] == "zoo_hf.ZooForCausalLM"
        assert cfg["auto_map"]["AutoModelForSequenceClassification"] == "zoo_hf.ZooForSequenceClassification"
        assert (d / "zoo_hf.py").is_file()
        assert not list(d.glob("*.bin"))
    tok_cfg = json.loads((lm_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["auto_map"]["AutoTokenizer"][0] == "zoo_hf.ByteTokenizer"


def test_fresh_process_without_import_zoo_loads_model_classifier_and_tokenizer(saved):
    root, lm, clf, tok, lm_dir, cls_dir = saved
    proc = run_child(root, lm_dir, cls_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(root / "out.safetensors")
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    assert torch.equal(got["ids"], ids)
    with torch.no_grad():
        torch.testing.assert_close(got["lm"], lm(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(got["clf"], clf(ids).logits, rtol=0, atol=0)
        assert torch.equal(got["generated"], lm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id))
    # The classes are the installed package's own, not copies of its source.
    assert proc.stdout.split() == ["zoo.data.tokenizer", "zoo.data.tokenizer", "zoo.models.modeling", "zoo.models.modeling"]


def test_fresh_process_without_seq_zoo_fails_with_one_sentence_naming_pip_install(saved):
    root, _, _, _, lm_dir, cls_dir = saved
    code = "import sys\n" + BLOCK_ZOO + BLOCKED_CHILD
    env = {**os.environ, "HF_HOME": str(root / "hf_home_blocked"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(root / "tok"), str(lm_dir), str(cls_dir)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    messages = proc.stdout.strip().splitlines()
    assert len(messages) == 3, proc.stdout
    for msg in messages:  # tokenizer, causal LM, classifier: each one sentence naming the fix
        assert "pip install seq-zoo" in msg and msg.endswith(".") and msg.count(". ") == 0, msg


def test_loading_in_process_needs_no_trust_remote_code(saved):
    _, lm, _, _, lm_dir, _ = saved
    loaded = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    x = torch.randint(0, 259, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, lm(x).logits, rtol=0, atol=0)
    # Loading through the remote-code path must not mark the classes for copying their source on the next save.
    assert ZooForCausalLM._auto_class is None and ZooConfig._auto_class is None


def test_converted_checkpoint_gets_the_same_files(tmp_path):
    from transformers import MambaConfig, MambaForCausalLM

    from zoo.convert import convert_checkpoint

    torch.manual_seed(0)
    ref = MambaForCausalLM(MambaConfig(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=1)).eval()
    ref.save_pretrained(tmp_path / "hf")
    out = convert_checkpoint(tmp_path / "hf", tmp_path / "zoo")
    assert (out / "zoo_hf.py").is_file()
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoConfig"] == "zoo_hf.ZooConfig"
