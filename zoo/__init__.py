"""seq-zoo: efficient sequence architectures behind one block interface and one HF model family.

Importing ``zoo`` registers ``ZooConfig`` and the ``Zoo*`` models with transformers' Auto* factories.
"""

from zoo import models  # noqa: F401  (registers the Auto* classes)
from zoo.config import ConfigError, RunConfig, build_model, load_config
from zoo.models import ZooConfig, ZooForCausalLM, ZooForSequenceClassification, ZooModel
from zoo.registry import get_mixer, list_mixers, register_mixer


def _register_tokenizer() -> None:
    # AutoTokenizer finds the built-in byte tokenizer by the class name saved in tokenizer_config.json.
    from transformers import AutoTokenizer

    from zoo.data.tokenizer import ByteTokenizer

    AutoTokenizer.register(ZooConfig, slow_tokenizer_class=ByteTokenizer, exist_ok=True)


_register_tokenizer()

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "RunConfig", "ZooConfig", "ZooForCausalLM", "ZooForSequenceClassification", "ZooModel",
    "__version__", "build_model", "get_mixer", "list_mixers", "load_config", "register_mixer",
]
