"""YAML / dict -> validated run config, with clear one-sentence errors naming the key path.

A run config has three sections: ``model`` (-> :class:`zoo.models.ZooConfig`), ``train`` and ``task``
(dataclasses in ``zoo.train.config``). Several sources are deep-merged in order, then ``key.path=value``
overrides (values parsed as YAML) are applied, then everything is validated.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

#: The configs that ship with the package (zoo/configs/; the checkout's top-level configs/ links here), so
#: `zoo train mamba` and `--task mqar` work after a plain `pip install` outside the checkout.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SECTIONS = ("model", "train", "task")
MODEL_ALIASES = {"tie_embeddings": "tie_word_embeddings"}


@functools.cache
def model_keys() -> dict[str, Any]:
    """The model section's keys and their types, read from the one declaration: ``ZooConfig``'s own fields
    (plus ``num_labels``, which the classification head takes from transformers' config)."""
    import zoo.models.configuration as module
    from zoo.models.configuration import BACKEND_SETTINGS, POOLING, ZooConfig

    own = ZooConfig.__dict__.get("__annotations__", {})  # ZooConfig's own fields, not transformers' base fields
    keys = {k: eval(t, vars(module)) if isinstance(t, str) else t for k, t in own.items() if not k.startswith("_")}
    keys["pooling"] = Literal[POOLING]  # the choices, for the error message
    keys["backend"] = Literal[BACKEND_SETTINGS]
    keys["num_labels"] = int
    return keys


class ConfigError(ValueError):
    """A config problem, stated in one sentence naming the key path and the fix."""


@dataclasses.dataclass
class RunConfig:
    """A validated run: the model config, the training and the task settings, and where they came from."""

    model: Any  # zoo.models.ZooConfig
    train: Any  # zoo.train.config.TrainConfig
    task: Any  # zoo.train.config.TaskConfig
    source: list[str]
    raw: dict

    def to_dict(self) -> dict:
        """The merged, override-applied config as plain data (what ``zoo_run.yaml`` stores)."""
        return {
            "model": self.raw.get("model", {}),
            "train": dataclasses.asdict(self.train),
            "task": dataclasses.asdict(self.task),
        }


# ----- reading ---------------------------------------------------------------------------------------

def _suggest(key: str, allowed) -> str:
    close = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def resolve_path(name: str | Path) -> Path:
    """A config path; a bare name like ``mamba`` or ``tasks/mqar`` is looked up in the packaged configs."""
    p = Path(name)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / f"{name}"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file {str(name)!r} not found; pass an existing YAML path or a packaged config name ({', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))}).")


def task_path(name: str | Path) -> str:
    """A task YAML path; a bare name like ``mqar`` means the packaged ``configs/tasks/mqar.yaml``."""
    if os.path.exists(name):
        return str(name)
    cand = CONFIG_DIR / "tasks" / f"{name}.yaml"
    return str(cand) if cand.is_file() else str(name)


def read_yaml(path: str | Path) -> dict:
    """Read one YAML mapping with clear errors for a missing file or bad syntax."""
    p = resolve_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p} is not a text YAML file (it holds binary bytes); pass a YAML config file.") from None
    except IsADirectoryError:
        raise ConfigError(f"{p} is a folder, not a YAML file; pass a YAML config file.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}: YAML syntax error{where}: {problem}; fix the file's syntax.") from None
    if data is None:
        raise ConfigError(
            f"{p} is empty; put the model/train/task sections in it (see configs/attention.yaml), "
            "or leave the file out to use the defaults."
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping with sections {', '.join(SECTIONS)}, got {type(data).__name__}.")
    return data


def deep_merge(base: dict, other: dict) -> dict:
    """``other`` merged into a copy of ``base`` (mappings recursively, everything else replaced)."""
    out = dict(base)
    for k, v in other.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML) to a nested dict."""
    data = copy.deepcopy(data)  # a copy all the way down: never write into the caller's (nested) dicts
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value (e.g. train.lr=1e-3).")
        key, _, raw = item.partition("=")
        if not key.strip() or any(not part.strip() for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key path; write key.path=value (e.g. train.lr=1e-3).")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section; check the key path.")
        node[parts[-1]] = value
    return data


# ----- type checking -------------------------------------------------------------------------------

def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def check_value(value, tp, path: str):
    """Return ``value`` converted to annotation ``tp`` (int->float, '1e-3'->float) or raise ConfigError."""
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        for a in args:
            try:
                return check_value(value, a, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}.")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{path}: {value!r} is not allowed; choose {_type_name(tp)}.{_suggest(value, args)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp in (list, tuple) or origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            if args and args[-1] is not Ellipsis:
                return [check_value(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
            if args:
                return [check_value(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
            return list(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}.")


def validate_dataclass(cls, data: dict | None, path: str):
    """Build dataclass ``cls`` from ``data``: unknown keys (with a suggestion) and wrong types fail clearly."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{path}.{key}: unknown key.{_suggest(key, names)} Allowed: {', '.join(names)}.")
        kwargs[key] = check_value(value, hints[key], f"{path}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(f"{path}.") else f"{path}: {msg}") from None


# ----- the model section ---------------------------------------------------------------------------

def constructor_options(cls) -> dict[str, tuple[Any, inspect.Parameter]]:
    """A class's config options: name -> (annotation, parameter), read from the keyword-only arguments of its
    ``__init__`` and, where that passes ``**options`` on to ``super().__init__``, of the next ``__init__`` up the MRO
    (e.g. Hydra re-declares ``d_state`` and ``d_conv`` and takes the rest from ``zoo.nn.init.SSDLayer``)."""
    chain = []  # (annotations, parameters) of each __init__, the class's own first
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        chain.append((typing.get_type_hints(init), params))
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    names = dict.fromkeys(n for _, params in reversed(chain) for n, p in params.items()  # in the base's order
                          if p.kind == p.KEYWORD_ONLY and n != "layer_idx")
    out = {}
    for n in names:
        hints, params = next((h, ps) for h, ps in chain if n in ps)  # the nearest declaration wins
        out[n] = (hints.get(n, Any), params[n])
    return out


def mixer_schema(cls) -> dict[str, Any]:
    """Keyword arguments a mixer accepts from config, with their annotations."""
    return {n: hint for n, (hint, _) in constructor_options(cls).items()}


def validate_mixer_kwargs(name: str, kwargs: dict, path: str) -> dict:
    """Check one mixer's kwargs against its constructor signature."""
    from zoo.registry import get_mixer

    try:
        cls = get_mixer(name)
    except KeyError as e:
        raise ConfigError(f"{path}: {e.args[0]}") from None
    schema = mixer_schema(cls)
    if "backend" not in schema:  # every mixer takes a kernel backend setting (zoo.registry.build_mixer)
        from zoo.models.configuration import BACKEND_SETTINGS

        schema = {**schema, "backend": Literal[BACKEND_SETTINGS] | None}
    out = {}
    for key, value in (kwargs or {}).items():
        if key not in schema:
            raise ConfigError(
                f"{path}.{key}: unknown option for mixer {name!r}.{_suggest(key, schema)} Allowed: {', '.join(schema)}."
            )
        out[key] = check_value(value, schema[key], f"{path}.{key}")
    return out


def validate_model(data: dict | None, path: str = "model"):
    """Validate the model section and return a :class:`zoo.models.ZooConfig`.

    Types are checked against ``ZooConfig``'s fields, the layer list is normalised once (by ``ZooConfig``, see
    :func:`zoo.models.configuration.resolve_layers`) and each resolved layer is checked against its mixer's
    constructor; then :func:`check_model_size` builds the model once on the meta device, so an impossible shape
    fails now, naming the layer.
    """
    from zoo.models import ZooConfig
    from zoo.nn.mlp import MLP_KINDS

    data = dict(data or {})
    for alias, real in MODEL_ALIASES.items():
        if alias in data:
            data[real] = data.pop(alias)
    keys = model_keys()
    clean = {}
    for key, value in data.items():
        if key not in keys:
            raise ConfigError(f"{path}.{key}: unknown key.{_suggest(key, keys)} Allowed: {', '.join(keys)}.")
        clean[key] = check_value(value, keys[key], f"{path}.{key}")
    for key in ("vocab_size", "d_model", "n_layers"):
        if key in clean and clean[key] < 1:
            raise ConfigError(f"{path}.{key}: must be a positive integer, got {clean[key]}.")
    if clean.get("pattern") is not None and not clean["pattern"]:
        raise ConfigError(f"{path}.pattern is empty; list at least one mixer (e.g. [attention]) or leave pattern out.")
    if clean.get("layers") and "n_layers" in clean and clean["n_layers"] != len(clean["layers"]):
        raise ConfigError(
            f"{path}.n_layers={clean['n_layers']} but {path}.layers lists {len(clean['layers'])} layers; "
            f"drop n_layers (the layers list sets the depth) or edit the layers list."
        )
    for name, kw in (clean.get("mixers") or {}).items():
        if not isinstance(kw, dict):
            raise ConfigError(f"{path}.mixers.{name}: expected a mapping of options, got {kw!r}.")
    if clean.get("mlp", "swiglu") not in MLP_KINDS:
        raise ConfigError(f"{path}.mlp: {clean['mlp']!r} is not an MLP kind; choose one of {', '.join(MLP_KINDS)}.")
    if clean.get("moe"):
        _validate_moe(clean["moe"], f"{path}.moe")
    try:
        config = ZooConfig(**clean)
    except (TypeError, ValueError) as e:
        raise ConfigError(_at(path, e)) from None
    explicit = bool(clean.get("layers"))
    used = set(config.mixer_names)
    for name, kw in (config.mixers or {}).items():
        if name not in used:
            raise ConfigError(
                f"{path}.mixers.{name}: settings for mixer {name!r}, which no layer uses (layers: {', '.join(sorted(used))}); "
                f"remove them or add {name!r} to {path}.{'layers' if explicit else 'pattern'}."
            )
        config.mixers[name] = validate_mixer_kwargs(name, kw, f"{path}.mixers.{name}")
    pattern = config.pattern or ["attention"]
    for i, spec in enumerate(config.layers):
        p = f"{path}.layers[{i}]" if explicit else f"{path}.pattern[{i % len(pattern)}]"
        if spec["mlp"] not in MLP_KINDS:
            raise ConfigError(f"{p}.mlp: {spec['mlp']!r} is not an MLP kind; choose one of {', '.join(MLP_KINDS)}.")
        spec["kwargs"] = validate_mixer_kwargs(spec["mixer"], spec["kwargs"], p)
    check_model_size(config, path=path)
    return config


def _validate_moe(moe: dict, path: str) -> None:
    """Type-check the MoE options in place against ``MoE``'s constructor, and build one on the meta device."""
    import torch

    from zoo.nn.moe import MoE

    schema = {k: v for k, v in mixer_schema(MoE).items() if k != "hidden"}
    for key, value in moe.items():
        if key not in schema:
            raise ConfigError(f"{path}.{key}: unknown MoE option.{_suggest(key, schema)} Allowed: {', '.join(schema)}.")
        moe[key] = check_value(value, schema[key], f"{path}.{key}")
    try:
        with torch.device("meta"):
            MoE(1, **moe)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def _at(path: str, e: BaseException) -> str:
    """``e``'s message under the key path ``path`` (a message that names a layer, ``layers[i] ...``, extends it)."""
    msg = str(e)
    return f"{path}.{msg}" if msg.startswith("layers[") else f"{path}: {msg}"


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e12:.1f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB"


def check_model_size(model_cfg, *, memory: int | None = None, path: str = "model") -> int:
    """The parameter count of a model config, from one build on the meta device.

    That build is the config's shape check: a layer that cannot be built (heads not dividing the width, a size of 0)
    fails with a ConfigError naming it (see :func:`zoo.registry.build_mixer`); a model whose fp32 weights alone
    exceed this machine's memory is refused with a ConfigError naming the setting that makes it large.
    """
    import torch

    from zoo.models import ZooForCausalLM

    try:
        with torch.device("meta"):
            model = ZooForCausalLM(model_cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(_at(path, e)) from None
    n = sum(p.numel() for p in model.parameters())
    memory = _physical_memory() if memory is None else memory
    if memory and 4 * n > memory:
        embed = model_cfg.vocab_size * model_cfg.d_model * (1 if model_cfg.tie_word_embeddings else 2)
        hint = (f"{path}.vocab_size (now {model_cfg.vocab_size})" if embed > n / 2
                else f"{path}.d_model (now {model_cfg.d_model}) or n_layers (now {model_cfg.n_layers})")
        raise ConfigError(
            f"the model has {n:.3g} parameters ({_gb(4 * n)} in fp32), more than this machine's {_gb(memory)} of memory; "
            f"reduce {hint}."
        )
    return n


def _check_device(name: str) -> None:
    import torch

    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"train.device: {name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None


# ----- entry points ----------------------------------------------------------------------------------

def load_config(source, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a run config from a path, a dict, or a list of them (deep-merged in order)."""
    from zoo.train.config import TaskConfig, TrainConfig

    sources = source if isinstance(source, (list, tuple)) else [source]
    merged: dict = {}
    names = []
    for s in sources:
        if isinstance(s, dict):
            merged = deep_merge(merged, s)
            names.append("<dict>")
        else:
            merged = deep_merge(merged, read_yaml(s))
            names.append(str(s))
    merged = apply_overrides(merged, overrides)
    for key in merged:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown top-level section.{_suggest(key, SECTIONS)} Allowed: {', '.join(SECTIONS)}.")
    model = validate_model(merged.get("model"), "model")
    train = validate_dataclass(TrainConfig, merged.get("train"), "train")
    _check_device(train.device)
    task = validate_dataclass(TaskConfig, merged.get("task"), "task")
    return RunConfig(model=model, train=train, task=task, source=names, raw=merged)


def build_model(config, *, head: str = "causal_lm"):
    """A freshly initialised model from a RunConfig, ZooConfig, dict or path.

    ``head``: ``causal_lm`` (ZooForCausalLM), ``classification`` (ZooForSequenceClassification) or ``base`` (ZooModel).
    """
    from zoo.models import ZooConfig, ZooForCausalLM, ZooForSequenceClassification, ZooModel

    classes = {"causal_lm": ZooForCausalLM, "classification": ZooForSequenceClassification, "base": ZooModel}
    if head not in classes:
        raise ValueError(f"build_model: unknown head {head!r}; choose one of {', '.join(classes)}.")
    if isinstance(config, RunConfig):
        model_cfg = config.model  # validate_model checked it (one build on the meta device)
    elif isinstance(config, ZooConfig):
        model_cfg = config
        check_model_size(model_cfg)  # a config made directly has not been through validate_model
    elif isinstance(config, dict) and "model" not in config:
        model_cfg = validate_model(config)
    else:
        model_cfg = validate_model((read_yaml(config) if not isinstance(config, dict) else config).get("model"))
    return classes[head](model_cfg)
