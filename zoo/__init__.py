"""seq-zoo: efficient sequence architectures behind one block interface and one HF model family."""

from zoo.registry import get_mixer, list_mixers, register_mixer

__version__ = "0.1.0"

__all__ = ["get_mixer", "list_mixers", "register_mixer", "__version__"]
