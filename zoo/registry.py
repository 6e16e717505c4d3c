"""Mixer registry: name -> mixer class.

Mixers register themselves with :func:`register_mixer`; every module in ``zoo/mixers`` is imported
on first use, so a new architecture is one new file and nothing else changes.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import warnings
from collections.abc import Callable

_MIXERS: dict[str, type] = {}
_FAILED: dict[str, str] = {}
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
            try:
                importlib.import_module(f"zoo.mixers.{info.name}")
            except Exception as e:  # one broken module must not take the others down; get_mixer reports it
                _FAILED[info.name] = f"{type(e).__name__}: {e}"
                warnings.warn(f"zoo: mixer module zoo.mixers.{info.name} failed to import ({_FAILED[info.name]}).", stacklevel=2)


def build_mixer(name: str, d_model: int, *, layer_idx: int = 0, kwargs: dict | None = None,
                backend: str | None = None):
    """The mixer ``name`` built from its layer's kwargs, with its kernel backend setting.

    ``kwargs["backend"]`` (``model.mixers.<name>.backend``) overrides the model's ``backend``; a mixer whose
    constructor takes ``backend`` (MoM) also receives it. "auto" is stored as None (each kernel chooses). A layer that
    cannot be built raises a ValueError (or TypeError) that names it: ``layers[i] (name): ...``.
    """
    import inspect

    cls = get_mixer(name)
    kwargs = dict(kwargs or {})
    own = kwargs.get("backend") if "backend" in inspect.signature(cls.__init__).parameters else kwargs.pop("backend", None)
    setting = own if own is not None else backend
    try:
        mixer = cls(d_model, layer_idx=layer_idx, **kwargs)
    except (ValueError, TypeError) as e:  # name the layer: the config's key path extends this message
        raise (TypeError if isinstance(e, TypeError) else ValueError)(f"layers[{layer_idx}] ({name}): {e}") from e
    except ArithmeticError as e:  # e.g. a size of 0 divides somewhere
        bad = [f"{k}={v}" for k, v in kwargs.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0]
        raise ValueError(
            f"layers[{layer_idx}] ({name}): {', '.join(bad) if bad else f'options {kwargs}'} gives an impossible layer "
            f"({e}); use positive sizes."
        ) from e
    mixer.backend = None if setting in (None, "auto") else setting
    return mixer


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
        failed = f" (modules that failed to import: {'; '.join(f'{k}: {v}' for k, v in _FAILED.items())})" if _FAILED else ""
        raise KeyError(f"unknown mixer {name!r}.{hint} Registered mixers: {', '.join(sorted(_MIXERS))}.{failed}")
    return _MIXERS[name]
