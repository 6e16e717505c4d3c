"""lm-evaluation-harness adapter: :class:`ZooLM` is lm-eval's ``HFLM`` over a zoo model object, :func:`run_lm_eval`
runs tasks on it.

Needs the ``[eval]`` extra (``pip install 'seq-zoo[eval]'``), imported only when ``ZooLM`` is first used. Tasks may
come from lm-eval's registry or from local task YAMLs (``include_path``), so evaluation can run with no download.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

#: Whether lm-eval (the ``[eval]`` extra) is installed; it is imported only when :class:`ZooLM` is used.
HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


class EvalError(ValueError):
    """An evaluation input problem, stated in one sentence naming the fix."""


def require_lm_eval() -> None:
    """Raise a clear error when lm-eval is not installed."""
    if not HAVE_LM_EVAL:
        raise EvalError("lm-eval is not installed; install the eval extra with pip install 'seq-zoo[eval]'.")


def load_for_eval(checkpoint: str | Path, tokenizer: str | None = None, *, device: str | None = None):
    """``(model, tokenizer)`` of a causal LM (:func:`zoo.loading.load_model_and_tokenizer`: a checkpoint, a LoRA
    adapter or a run directory), on ``device`` (default: cuda when available) in eval mode."""
    from zoo.loading import load_model_and_tokenizer

    try:
        model, tok = load_model_and_tokenizer(checkpoint, tokenizer, causal_lm=True)
    except (OSError, ValueError) as e:
        raise EvalError(str(e)) from None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(dev).eval(), tok


def __getattr__(name: str):
    if name == "ZooLM":  # built on first use: importing lm-eval's HFLM takes seconds
        return _zoo_lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _zoo_lm_class() -> type:
    """``ZooLM``: lm-eval's ``HFLM`` (its request batching, rolling windows, stop strings) over a zoo model object."""
    if not HAVE_LM_EVAL:
        class ZooLM:
            """Stands in for the lm-eval adapter when lm-eval is not installed: using it says how to install it."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                require_lm_eval()

        return ZooLM

    from lm_eval.models.huggingface import HFLM

    class ZooLM(HFLM):
        """lm-eval's ``HFLM`` over a zoo ``ZooForCausalLM`` (any mixer or hybrid) and its tokenizer.

        The zoo part is only what HFLM cannot know: the model is an object already loaded (no hub name), a causal LM,
        scored without special tokens added, with the progress bars shown or not for every request type.
        """

        def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8, max_length: int = 2048,
                     progress: bool = True) -> None:
            if batch_size < 1 or max_length < 2:
                raise EvalError(f"batch_size must be >= 1 and max_length >= 2 (got {batch_size}, {max_length}).")
            super().__init__(pretrained=model.eval(), tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                             max_length=max_length, add_bos_token=False)
            self.progress = progress

        @property
        def prefix_id(self) -> int:
            """The token that stands before a text with no context (bos, else eos): HFLM's ``prefix_token_id``."""
            return self.prefix_token_id

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            """lm-eval: log-likelihood of each continuation given its context, and whether it is the greedy one."""
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """lm-eval: total log-likelihood of each string, scored in disjoint windows of ``max_length`` tokens."""
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.progress)

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """lm-eval: continue each context until a stop string or the token limit."""
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.progress)

    return ZooLM


def run_lm_eval(
    checkpoint: str | Path,
    tasks: list[str] | str,
    *,
    include_path: str | list[str] | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_length: int = 2048,
    device: str | None = None,
    tokenizer: str | None = None,
    output_path: str | Path | None = None,
    progress: bool = True,
    include_defaults: bool | None = None,
) -> dict:
    """Run lm-eval ``tasks`` on a zoo checkpoint; returns ``{task: {metric: value}}`` (and writes it as JSON).

    ``include_defaults``: also index lm-eval's built-in tasks (None: only when a task is not in ``include_path``).
    """
    require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise EvalError("--tasks is empty; name at least one lm-eval task (e.g. --tasks lambada_openai).")
    model, tok = load_for_eval(checkpoint, tokenizer, device=device)
    manager, missing = None, names
    if include_path is not None and include_defaults is not True:  # local tasks first: indexing lm-eval's own is slow
        manager = TaskManager(include_path=include_path, include_defaults=False)
        missing = [t for t in names if t not in set(manager.all_tasks)]
    if missing and include_defaults is not False:
        manager = TaskManager(include_path=include_path)
        missing = [t for t in names if t not in set(manager.all_tasks)]
    if missing:
        raise EvalError(
            f"unknown lm-eval task(s) {', '.join(missing)}; check the names (lm-eval --tasks list) "
            "or pass --include-path with the folder of your task YAMLs."
        )
    lm = _zoo_lm_class()(model, tok, batch_size=batch_size, max_length=max_length, progress=progress)
    res = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                  log_samples=False, bootstrap_iters=0)
    results = {task: {k: v for k, v in metrics.items() if k != "alias"} for task, metrics in res["results"].items()}
    if output_path is not None:
        write_json(output_path, {"checkpoint": str(checkpoint), "tasks": names, "results": results})
    return results


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
