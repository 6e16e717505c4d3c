"""Checkpoint conversion: transformers Mamba / Mamba-2 and original mamba_ssm layouts -> zoo, no download."""

import inspect
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM
from transformers.models.mamba2 import modeling_mamba2

import zoo  # noqa: F401  (registers the zoo Auto classes)
from zoo.convert import ConversionError, convert_checkpoint


def hf_mamba(tmp_path):
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=101, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                      pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = MambaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


# transformers before the fix normalises Mamba-2's gated norm over all groups at once; mamba_ssm (and zoo, and newer
# transformers) normalise each group alone. With one group the two agree, so the old reference is used with one.
# (The class is private and was renamed MambaRMSNormGated -> Mamba2RMSNormGated in 5.25: look up either.)
_HF_GATED_NORM = getattr(modeling_mamba2, "Mamba2RMSNormGated", None) or modeling_mamba2.MambaRMSNormGated
HF_NORMS_PER_GROUP = "group_size" in inspect.signature(_HF_GATED_NORM.__init__).parameters


def hf_mamba2(tmp_path):
    torch.manual_seed(0)
    groups = 2 if HF_NORMS_PER_GROUP else 1
    cfg = Mamba2Config(vocab_size=101, hidden_size=32, state_size=16, num_heads=8, head_dim=8, n_groups=groups, expand=2,
                       num_hidden_layers=2, chunk_size=8, conv_kernel=4, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():  # make the gated norm and D non-trivial so a wrong mapping shows
        for layer in model.backbone.layers:
            layer.mixer.norm.weight.uniform_(0.5, 1.5)
            layer.mixer.D.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "hf2")
    return model, tmp_path / "hf2"


def assert_same_model(ref, path):
    ours = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(ours).__name__ == "ZooForCausalLM"
    x = torch.randint(1, 101, (2, 19))
    with torch.no_grad():
        a, b = ref(x).logits, ours(x).logits
        assert ((a - b).norm() / a.norm()) < 1e-4
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(ref.generate(x[:, :5], **kw), ours.generate(x[:, :5], **kw))


def test_hf_mamba_converts_to_identical_logits_and_generation(tmp_path):
    ref, src = hf_mamba(tmp_path)
    assert_same_model(ref, convert_checkpoint(src, tmp_path / "zoo"))


def test_hf_mamba2_converts_to_identical_logits_and_generation(tmp_path):
    ref, src = hf_mamba2(tmp_path)
    assert_same_model(ref, convert_checkpoint(src, tmp_path / "zoo2"))


def test_mamba_ssm_checkpoint_converts(tmp_path):
    ref, _ = hf_mamba(tmp_path)
    src = tmp_path / "ssm"
    src.mkdir()
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in ref.state_dict().items()}
    torch.save(sd, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps({
        "d_model": 32, "d_intermediate": 0, "n_layer": 2, "vocab_size": 101,
        "ssm_cfg": {"d_state": 8, "d_conv": 4, "expand": 2}, "rms_norm": True, "residual_in_fp32": True,
        "fused_add_norm": True, "pad_vocab_size_multiple": 1, "tie_embeddings": True,
    }))
    assert_same_model(ref, convert_checkpoint(src, tmp_path / "zoo"))


def test_convert_rejects_what_it_does_not_understand(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        convert_checkpoint(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConversionError, match="neither"):
        convert_checkpoint(tmp_path, tmp_path / "out")
