"""The Hugging Face model family, registered with the Auto* factories on import."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from zoo.models.cache import RecurrentStateLayer, ZooCache, get_state, set_state
from zoo.models.configuration import ZooConfig
from zoo.models.modeling import (
    GENERATION_CACHE_KEY,
    ZooBlock,
    ZooForCausalLM,
    ZooForSequenceClassification,
    ZooModel,
    ZooPreTrainedModel,
)

AutoConfig.register("zoo", ZooConfig, exist_ok=True)
AutoModel.register(ZooConfig, ZooModel, exist_ok=True)
AutoModelForCausalLM.register(ZooConfig, ZooForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(ZooConfig, ZooForSequenceClassification, exist_ok=True)

__all__ = [
    "GENERATION_CACHE_KEY", "RecurrentStateLayer", "ZooBlock", "ZooCache", "ZooConfig", "ZooForCausalLM",
    "ZooForSequenceClassification", "ZooModel", "ZooPreTrainedModel", "get_state", "set_state",
]
