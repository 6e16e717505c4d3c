"""Loading a saved model and its tokenizer from a directory: the one path that ``zoo eval``, ``zoo generate``,
``zoo finetune`` and the evaluation harness share.

A directory is a checkpoint (``config.json`` + safetensors, written by ``zoo train`` / ``zoo finetune`` /
``save_pretrained``), a LoRA adapter folder (``adapter_config.json``, merged into its base), or a run directory
(its ``final/``, else its newest ``checkpoint-<step>``). The tokenizer is the one saved beside the checkpoint,
else the byte tokenizer (:func:`zoo.data.tokenizer.checkpoint_tokenizer`).
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"


class LoadError(ValueError):
    """A directory that does not load as a model, stated in one sentence naming the fix."""


def is_checkpoint(path: str | Path) -> bool:
    """True for a folder holding a saved model (``config.json``)."""
    return (Path(path) / "config.json").is_file()


def find_checkpoint(path: str | Path) -> Path:
    """The model folder that ``path`` names: a checkpoint or a LoRA adapter folder as is, a run directory resolved
    to its latest checkpoint (``final/`` first). Raises a ``CheckpointError`` naming the fix otherwise."""
    from zoo.train.checkpoint import CheckpointError, resolve_checkpoint

    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"checkpoint {str(p)!r} does not exist; pass a folder written by `zoo train --out` or `zoo finetune`."
        )
    return p if (p / ADAPTER_CONFIG).is_file() else resolve_checkpoint(p)


def load_model(path: str | Path, *, merge: bool = True, causal_lm: bool = False):
    """The model saved in ``path`` (see :func:`find_checkpoint`): ``ZooForCausalLM`` or ``ZooForSequenceClassification``
    as its ``config.json`` says, or a LoRA adapter on its base (merged when ``merge``).

    ``causal_lm``: refuse anything but a causal LM (generation, task accuracy, lm-eval and perplexity need one).
    """
    p = find_checkpoint(path)
    model = _load_adapter(p, merge) if (p / ADAPTER_CONFIG).is_file() else _from_pretrained(p, _head_class(p))
    if causal_lm and not hasattr(model, "lm_head"):
        raise LoadError(f"{str(p)!r} is a {type(model).__name__}; lm-eval and perplexity need a causal-LM checkpoint, "
                        "as do zoo eval and zoo generate.")
    return model


def load_model_and_tokenizer(path: str | Path, tokenizer: str | None = None, *, merge: bool = True,
                             causal_lm: bool = False):
    """``(model, tokenizer)`` from a directory: the model as :func:`load_model` finds it, the tokenizer ``tokenizer``
    ("byte" or a folder) when given, else the one saved beside the checkpoint, else the byte tokenizer."""
    p = find_checkpoint(path)
    return load_model(p, merge=merge, causal_lm=causal_lm), load_tokenizer(p, tokenizer)


def load_tokenizer(path: str | Path, tokenizer: str | None = None):
    """The tokenizer for the model in ``path``: ``tokenizer`` ("byte" or a folder) when given, else the one saved
    beside the checkpoint, else the byte tokenizer; a bad one fails with a LoadError naming ``--tokenizer``."""
    from zoo.data.tokenizer import checkpoint_tokenizer

    try:
        return checkpoint_tokenizer(path, tokenizer)
    except (OSError, ValueError) as e:
        raise LoadError(str(e).replace("task.tokenizer", "--tokenizer")) from None


def _head_class(p: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        archs = json.loads((p / "config.json").read_text()).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        archs = []
    return AutoModelForSequenceClassification if "ZooForSequenceClassification" in archs else AutoModelForCausalLM


def _from_pretrained(p: Path, cls, **kwargs):
    """``cls.from_pretrained(p)``; a damaged weight file becomes one sentence naming the file."""
    from zoo.train.checkpoint import quiet_hf_progress

    try:
        with quiet_hf_progress():
            return cls.from_pretrained(str(p), **kwargs)
    except Exception as e:  # safetensors raises its own SafetensorError (not a ValueError) for a damaged file
        if type(e).__name__ != "SafetensorError" and "safetensors" not in str(e).lower():
            raise
        name = next((f.name for f in (p / "model.safetensors", p / "model.safetensors.index.json") if f.exists()),
                    "model.safetensors")
        raise LoadError(
            f"{p / name} is damaged or not a safetensors file ({' '.join(str(e).split())}); "
            "re-save the checkpoint or pass another one."
        ) from None


def _load_adapter(p: Path, merge: bool):
    """A LoRA adapter folder on its base model (``base_model_name_or_path``), merged into it when ``merge``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        from peft import PeftModel
    except ImportError:
        raise LoadError(f"{p} is a LoRA adapter, which needs peft; install it with pip install 'seq-zoo[peft]'.") from None
    meta = json.loads((p / ADAPTER_CONFIG).read_text())
    base_path = meta.get("base_model_name_or_path")
    if not base_path or not is_checkpoint(base_path):
        raise LoadError(
            f"{p}: the adapter's base model {base_path!r} is not a local checkpoint; fix base_model_name_or_path "
            f"in {ADAPTER_CONFIG}."
        )
    if meta.get("task_type") == "SEQ_CLS":
        found = [f for f in (p / "finetune_config.json", p.parent / "finetune_config.json") if f.is_file()]
        info = json.loads(found[0].read_text()) if found else {}
        id2label = {int(k): v for k, v in (info.get("id2label") or {}).items()} or None
        base = _from_pretrained(Path(base_path), AutoModelForSequenceClassification,
                                num_labels=len(id2label or {0: 0, 1: 1}), id2label=id2label,
                                ignore_mismatched_sizes=True)
    else:
        base = _from_pretrained(Path(base_path), AutoModelForCausalLM)
    model = PeftModel.from_pretrained(base, str(p))
    return model.merge_and_unload() if merge else model
