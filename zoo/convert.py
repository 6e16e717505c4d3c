"""Convert Mamba / Mamba-2 checkpoints into zoo checkpoints that ``AutoModelForCausalLM`` loads.

Two source layouts are understood:

* transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` (``backbone.embeddings``, config ``model_type``
  ``mamba`` / ``mamba2``);
* the original ``mamba_ssm`` ``MambaLMHeadModel`` (``backbone.embedding``, config with ``d_model``,
  ``n_layer``, ``ssm_cfg``; Mamba-1 or Mamba-2 layers, optional gated MLP).

Weights are read from safetensors when present; a ``pytorch_model.bin`` is read with
``torch.load(weights_only=True)``, which refuses anything but tensors. The result is written atomically.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


class ConversionError(ValueError):
    """The source is not a checkpoint this converter understands; the message says what to pass."""


def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{file} is not valid JSON ({e}); restore the file from the original checkpoint.") from None


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except FileNotFoundError:
        raise ConversionError(f"{file} is missing; copy every weight file the checkpoint lists.") from None
    except Exception as e:  # safetensors' SafetensorError is not a ValueError
        if type(e).__name__ != "SafetensorError":
            raise
        raise ConversionError(f"{file} is damaged or not a safetensors file ({e}); download it again.") from None


def _shard_files(src: Path, index: Path) -> list[Path]:
    """The shard files ``index`` names, each checked to lie inside ``src`` (no ``../`` or absolute names)."""
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConversionError(f"{index} has no weight_map of tensor name -> file name; restore the file.")
    root = src.resolve()
    files = []
    for name in sorted(set(weight_map.values())):
        path = (src / name).resolve()
        if Path(name).is_absolute() or not path.is_relative_to(root):
            raise ConversionError(
                f"{index} names the weight file {name!r}, which lies outside {src}; "
                "shard names must be plain file names inside the checkpoint folder."
            )
        files.append(path)
    return files


def _read_state_dict(src: Path) -> dict[str, torch.Tensor]:
    if (src / "model.safetensors").exists():
        return _load_safetensors(src / "model.safetensors")
    index = src / "model.safetensors.index.json"
    if index.exists():
        out: dict[str, torch.Tensor] = {}
        for f in _shard_files(src, index):
            out.update(_load_safetensors(f))
        return out
    if (src / "pytorch_model.bin").exists():
        try:
            return torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ConversionError(
                f"{src / 'pytorch_model.bin'} is not a safe checkpoint file (it holds Python objects beyond tensors, "
                "which weights_only loading refuses); convert from a safetensors or plain-tensor checkpoint."
            ) from None
        except (RuntimeError, EOFError) as e:
            raise ConversionError(f"{src / 'pytorch_model.bin'} is damaged or truncated ({_first_line(e)}); download it again.") from None
    raise ConversionError(f"{src}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin found.")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def detect_format(config: dict) -> str:
    """``hf-mamba``, ``hf-mamba2`` or ``mamba_ssm`` from a checkpoint's config.json."""
    if config.get("model_type") == "mamba":
        return "hf-mamba"
    if config.get("model_type") == "mamba2":
        return "hf-mamba2"
    if {"d_model", "n_layer"} <= set(config):
        return "mamba_ssm"
    raise ConversionError(
        "config.json is neither a transformers Mamba/Mamba-2 config (model_type 'mamba'/'mamba2') nor a mamba_ssm "
        "config (d_model, n_layer, ssm_cfg); pass a Mamba checkpoint directory."
    )


def _hf_mamba_config(c: dict) -> tuple[dict, dict]:
    kwargs = {
        "d_state": c.get("state_size", 16), "d_conv": c.get("conv_kernel", 4), "expand": c.get("expand", 2),
        "dt_rank": c.get("time_step_rank", "auto") if c.get("time_step_rank", "auto") != "auto" else None,
        "conv_bias": c.get("use_conv_bias", True), "bias": c.get("use_bias", False),
    }
    model = {"d_model": c["hidden_size"], "n_layers": c["num_hidden_layers"], "vocab_size": c["vocab_size"],
             "norm_eps": c.get("layer_norm_epsilon", 1e-5), "tie_word_embeddings": c.get("tie_word_embeddings", True)}
    return model, {"mamba": {k: v for k, v in kwargs.items() if v is not None}}


def _as_float(v) -> float:
    # transformers writes non-finite floats into config.json as {"__float__": "Infinity"}.
    return float(v["__float__"]) if isinstance(v, dict) else float(v)


def _hf_mamba2_config(c: dict) -> tuple[dict, dict]:
    kwargs = {
        "d_state": c.get("state_size", 128), "d_conv": c.get("conv_kernel", 4), "expand": c.get("expand", 2),
        "headdim": c.get("head_dim", 64), "ngroups": c.get("n_groups", 1), "chunk_size": c.get("chunk_size", 256),
        "conv_bias": c.get("use_conv_bias", True), "bias": c.get("use_bias", False),
        "norm_eps": c.get("layer_norm_epsilon", 1e-5),
    }
    if c.get("num_heads") and c["num_heads"] * kwargs["headdim"] != kwargs["expand"] * c["hidden_size"]:
        raise ConversionError("Mamba-2 config: num_heads * head_dim must equal expand * hidden_size.")
    limit = [_as_float(v) for v in c.get("time_step_limit") or []]
    if limit and (limit[0] > 0 or limit[1] != float("inf")):
        raise ConversionError(f"Mamba-2 config: time_step_limit {limit} (dt clamping) is not supported by the zoo mixer.")
    model = {"d_model": c["hidden_size"], "n_layers": c["num_hidden_layers"], "vocab_size": c["vocab_size"],
             "norm_eps": c.get("layer_norm_epsilon", 1e-5), "tie_word_embeddings": c.get("tie_word_embeddings", False)}
    return model, {"mamba2": kwargs}


def _mamba_ssm_config(c: dict, vocab: int) -> tuple[dict, dict, str]:
    ssm = dict(c.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if c.get("attn_layer_idx"):
        raise ConversionError("mamba_ssm checkpoints with attention layers (attn_layer_idx) are not supported yet.")
    if not c.get("rms_norm", True):
        raise ConversionError("mamba_ssm checkpoints with LayerNorm (rms_norm: false) are not supported; zoo blocks use RMSNorm.")
    name = "mamba2" if layer == "Mamba2" else "mamba"
    allowed = {
        "mamba": ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor",
                  "conv_bias", "bias"),
        "mamba2": ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "dt_min", "dt_max",
                   "dt_init_floor", "conv_bias", "bias"),
    }[name]
    unknown = {k: v for k, v in ssm.items() if k not in allowed}
    if name == "mamba2":
        if unknown.pop("rmsnorm", True) is not True or unknown.pop("norm_before_gate", False) is not False:
            raise ConversionError("mamba_ssm Mamba2 with rmsnorm=false or norm_before_gate=true is not supported.")
        unknown.pop("d_ssm", None)
    for k in ("dt_limit", "use_mem_eff_path", "learnable_init_states", "activation"):
        unknown.pop(k, None)
    if unknown:
        raise ConversionError(f"mamba_ssm ssm_cfg options not supported by the zoo {name} mixer: {sorted(unknown)}.")
    kwargs = {k: v for k, v in ssm.items() if k in allowed and not (k == "dt_rank" and v == "auto")}
    model = {"d_model": c["d_model"], "n_layers": c["n_layer"], "vocab_size": vocab, "norm_eps": 1e-5,
             "tie_word_embeddings": c.get("tie_embeddings", True)}
    d_inter = c.get("d_intermediate", 0) or 0
    model["mlp"] = "swiglu" if d_inter else "none"
    if d_inter:
        model["mlp_hidden"] = d_inter
    return model, {name: kwargs}, name


def _map_keys(sd: dict[str, torch.Tensor], fmt: str, n_layers: int) -> dict[str, torch.Tensor]:
    emb = "backbone.embeddings.weight" if fmt.startswith("hf") else "backbone.embedding.weight"
    out = {"model.embed.weight": sd[emb], "model.norm_f.weight": sd["backbone.norm_f.weight"]}
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(n_layers):
        src, dst = f"backbone.layers.{i}.", f"model.layers.{i}."
        out[dst + "mixer_norm.weight"] = sd[src + "norm.weight"]
        for key, value in sd.items():
            if key.startswith(src + "mixer."):
                out[dst + key[len(src):]] = value
        if src + "mlp.fc1.weight" in sd:  # mamba_ssm GatedMLP: fc1 -> (y, gate); fc2(y * silu(gate))
            y, gate = sd[src + "mlp.fc1.weight"].chunk(2, dim=0)
            out[dst + "mlp.w1.weight"], out[dst + "mlp.w3.weight"] = gate, y
            out[dst + "mlp.w2.weight"] = sd[src + "mlp.fc2.weight"]
            out[dst + "mlp_norm.weight"] = sd[src + "norm2.weight"]
    return out


def convert_checkpoint(src: str | Path, out: str | Path) -> Path:
    """Convert the Mamba checkpoint directory ``src`` into a zoo checkpoint at ``out``; returns ``out``."""
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src} has no config.json; pass a Hugging Face or mamba_ssm Mamba checkpoint directory.")
    cfg = _read_json(src / "config.json")
    if not isinstance(cfg, dict):
        raise ConversionError(
            f"{src / 'config.json'} holds a JSON {type(cfg).__name__}, not an object of model settings; "
            "pass a Hugging Face or mamba_ssm Mamba checkpoint directory."
        )
    fmt = detect_format(cfg)
    sd = _read_state_dict(src)
    try:
        return _convert(src, out, cfg, fmt, sd)
    except KeyError as e:  # a config key or weight the format needs is absent
        name = e.args[0] if e.args else "?"
        where = "weight" if "." in str(name) else "config.json key"
        raise ConversionError(
            f"{src}: {where} {name!r} is missing for a {fmt} checkpoint; pass the complete checkpoint folder."
        ) from None


def _convert(src: Path, out: Path, cfg: dict, fmt: str, sd: dict[str, torch.Tensor]) -> Path:
    from zoo.models import ZooConfig, ZooForCausalLM

    if fmt == "hf-mamba":
        model_kw, mixers = _hf_mamba_config(cfg)
        name = "mamba"
    elif fmt == "hf-mamba2":
        model_kw, mixers = _hf_mamba2_config(cfg)
        name = "mamba2"
    else:
        model_kw, mixers, name = _mamba_ssm_config(cfg, sd["backbone.embedding.weight"].shape[0])
    model_kw.setdefault("mlp", "none")
    for tok in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(cfg.get(tok), int):
            model_kw[tok] = cfg[tok]
    zoo_cfg = ZooConfig(pattern=[name], mixers=mixers, rescale_prenorm_residual=False, **model_kw)
    mapped = _map_keys(sd, fmt, zoo_cfg.n_layers)
    if zoo_cfg.tie_word_embeddings:
        mapped.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = ZooForCausalLM(zoo_cfg)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if zoo_cfg.tie_word_embeddings else set())
    missing, extra = expected - set(mapped), set(mapped) - expected
    if missing or extra:
        raise ConversionError(
            f"{src}: weights do not map one to one (missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]})."
        )
    model.load_state_dict(mapped, strict=False, assign=True)
    if zoo_cfg.tie_word_embeddings:
        model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        for f in TOKENIZER_FILES:
            if (src / f).exists():
                shutil.copy2(src / f, tmp / f)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
