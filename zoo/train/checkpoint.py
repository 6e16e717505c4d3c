"""HF-format checkpoints written atomically, plus the trainer state that makes a resume exact.

A checkpoint directory holds ``config.json`` + ``model.safetensors`` (``save_pretrained``), the run config as
``zoo_run.yaml``, the trainer state as ``trainer_state.pt`` (tensors and plain data only, loaded with
``weights_only=True``) and, for text runs, the tokenizer. It is written into a temporary sibling directory and
renamed into place, so an interrupted save never damages the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

RUN_CONFIG = "zoo_run.yaml"
TRAINER_STATE = "trainer_state.pt"
FINAL = "final"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_RE = re.compile(r"^\.(?:checkpoint-\d+|final)\.tmp-(\d+)$")  # atomic_directory's half-written dirs
# Keys of a saved model config that say nothing about the architecture.
_IGNORED_MODEL_KEYS = {"transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "use_cache"}


class CheckpointError(ValueError):
    """A checkpoint problem, stated in one sentence with the fix."""


def _not_a_checkpoint(path: Path) -> CheckpointError:
    cfg = path / "config.json"
    if cfg.is_file():  # say what is wrong with this folder, not only that it is not a checkpoint
        try:
            data = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return CheckpointError(f"{cfg} is not valid JSON; restore the file, or pass the directory written by `zoo train --out`.")
        if not isinstance(data, dict):
            return CheckpointError(f"{cfg} holds a JSON {type(data).__name__}, not an object of model settings; restore the file.")
        if data.get("model_type") == "zoo":
            return CheckpointError(
                f"{path} has a zoo config.json but no model.safetensors weights; copy the weights in, or pass a "
                "complete checkpoint (a pytorch_model.bin alone is not read: re-save with save_pretrained)."
            )
    return CheckpointError(
        f"{path} is not a zoo checkpoint (no config.json with model_type 'zoo'); "
        "pass the directory written by `zoo train --out`."
    )


def is_zoo_checkpoint(path: str | Path) -> bool:
    """True when ``path`` holds a ``config.json`` of model_type ``zoo`` and safetensors weights."""
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        return False
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return model_type == "zoo" and has_weights


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """The periodic ``checkpoint-<step>`` directories of a run, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """``final`` if the run finished, else its newest ``checkpoint-<step>``, else None."""
    out_dir = Path(out_dir)
    if is_zoo_checkpoint(out_dir / FINAL):
        return out_dir / FINAL
    ckpts = [p for p in list_checkpoints(out_dir) if is_zoo_checkpoint(p)]
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (``--out``) resolved to its latest checkpoint.

    Raises :class:`CheckpointError` when neither holds a zoo checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass the directory written by `zoo train --out`.")
    if is_zoo_checkpoint(path):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise _not_a_checkpoint(path)
    return latest


def atomic_directory(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` then move ``tmp_dir`` to ``final``, replacing it only once the write succeeded."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)  # a directory cannot be replaced in one step: move the old one aside first
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # cannot tell: leave its directory alone
    return True


def remove_stale_temp_dirs(out_dir: str | Path) -> list[Path]:
    """Delete the ``.checkpoint-<step>.tmp-<pid>`` / ``.final.tmp-<pid>`` dirs of ``out_dir`` whose writer is gone.

    A save killed mid-write leaves its temporary directory behind; one whose process is still alive (a run
    writing into the same folder) is left alone. Returns the removed paths.
    """
    out_dir = Path(out_dir)
    removed = []
    if out_dir.is_dir():
        for p in sorted(out_dir.iterdir()):
            m = _TMP_RE.match(p.name)
            if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Silence transformers' own progress bars (shard writing / weight loading) inside our tqdm bar."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_checkpoint(
    path: str | Path,
    model: Any,
    *,
    run_config: dict | None = None,
    trainer_state: dict | None = None,
    tokenizer: Any = None,
    state_dict: dict | None = None,
) -> Path:
    """Write an HF checkpoint (+ run config, trainer state, tokenizer when given) atomically to ``path``.

    ``state_dict``: the weights to write instead of ``model``'s own (the gathered full state of a sharded model).
    """

    def write(tmp: Path) -> None:
        with quiet_hf_progress():
            if state_dict is None:
                model.save_pretrained(tmp)
            else:
                model.save_pretrained(tmp, state_dict=state_dict)
        if run_config is not None:
            (tmp / RUN_CONFIG).write_text(yaml.safe_dump(run_config, sort_keys=False))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_directory(path, write)


def load_trainer_state(path: str | Path) -> dict:
    """The trainer state of a checkpoint (``weights_only=True``: nothing is unpickled)."""
    file = Path(path) / TRAINER_STATE
    if not file.is_file():
        raise CheckpointError(
            f"{path} has no {TRAINER_STATE}, so training cannot resume from it; "
            "resume from a directory written by `zoo train` (checkpoint-<step> or final)."
        )
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{file} is not a safe checkpoint file (it holds Python objects that weights_only loading refuses); "
            "resume from a checkpoint written by `zoo train`."
        ) from None
    except (RuntimeError, EOFError):
        raise CheckpointError(f"{file} is damaged or truncated; resume from an earlier checkpoint.") from None


def load_run_config(path: str | Path) -> dict | None:
    """The ``zoo_run.yaml`` saved in a checkpoint, or None."""
    file = Path(path) / RUN_CONFIG
    return yaml.safe_load(file.read_text()) if file.is_file() else None


def rotate_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` periodic checkpoints (``keep <= 0`` keeps all)."""
    if keep > 0:
        for p in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def dict_diff(old: Any, new: Any, prefix: str) -> list[str]:
    """Key paths where two nested configs differ, e.g. ``['model.d_model', 'model.layers[0].kwargs.n_heads']``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            out += dict_diff(old.get(k), new.get(k), f"{prefix}.{k}")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in dict_diff(a, b, f"{prefix}[{i}]")]
    return [] if old == new else [prefix]


def model_config_diff(old: Any, new: Any) -> list[str]:
    """Differing key paths between two ``ZooConfig`` objects, ignoring bookkeeping keys."""
    def plain(cfg: Any) -> dict:  # a JSON round trip: tuples and lists compare equal, as after saving
        d = {k: v for k, v in cfg.to_dict().items() if k not in _IGNORED_MODEL_KEYS}
        return json.loads(json.dumps(d, default=str))

    return dict_diff(plain(old), plain(new), "model")


def rng_state() -> dict:
    """RNG states of python, numpy and torch (CPU and CUDA) as tensors / plain data."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
