"""Mixer registry: name -> mixer class.

Mixers register themselves with :func:`register_mixer`; every module in ``zoo/mixers`` is imported
on first use, so a new architecture is one new file and nothing else changes.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Callable

_MIXERS: dict[str, type] = {}
_loaded = False


def register_mixer(name: str) -> Callable[[type], type]:
    """Class decorator: make ``cls`` available under ``name`` in configs."""

    def deco(cls: type) -> type:
        if name in _MIXERS and _MIXERS[name] is not cls:
            raise ValueError(f"mixer name {name!r} is already registered by {_MIXERS[name].__qualname__}; pick another name.")
        cls.mixer_name = name
        _MIXERS[name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import zoo.mixers as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"zoo.mixers.{info.name}")


def list_mixers() -> list[str]:
    """Names of all registered mixers, sorted."""
    _load_builtin()
    return sorted(_MIXERS)


def get_mixer(name: str) -> type:
    """The mixer class registered as ``name``; a clear error listing the known names otherwise."""
    _load_builtin()
    if name not in _MIXERS:
        close = difflib.get_close_matches(str(name), list(_MIXERS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown mixer {name!r}.{hint} Registered mixers: {', '.join(sorted(_MIXERS))}.")
    return _MIXERS[name]
