"""seq-zoo's entry point for transformers' ``trust_remote_code`` loading.

``save_pretrained`` copies this file next to every zoo checkpoint and points ``auto_map`` (config.json,
tokenizer_config.json) at it, so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` works in a
process that never imported ``zoo``. It holds no model code: it imports the installed seq-zoo package.
"""

try:
    import zoo  # noqa: F401  (registers the zoo classes with the Auto* factories)
    from zoo.data.tokenizer import ByteTokenizer
    from zoo.models import ZooConfig, ZooForCausalLM, ZooForSequenceClassification, ZooModel
except ModuleNotFoundError as e:
    if e.name != "zoo":
        raise
    raise ImportError(
        "This checkpoint was saved by seq-zoo, which is not installed in this Python environment; "
        "run `pip install seq-zoo` and load it again."
    ) from None

__all__ = ["ByteTokenizer", "ZooConfig", "ZooForCausalLM", "ZooForSequenceClassification", "ZooModel"]
