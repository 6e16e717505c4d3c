"""lm-evaluation-harness adapter: :class:`ZooLM` wraps a zoo model object, :func:`run_lm_eval` runs tasks on it.

Needs the ``[eval]`` extra (``pip install 'seq-zoo[eval]'``). Tasks may come from lm-eval's registry or from
local task YAMLs (``include_path``), so evaluation can run with no download.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

try:
    from lm_eval.api.model import LM as _LMBase

    HAVE_LM_EVAL = True
except ImportError:  # the [eval] extra is optional; ZooLM explains how to install it when used
    _LMBase = object
    HAVE_LM_EVAL = False


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


class ZooLM(_LMBase):
    """An ``lm_eval.api.model.LM`` over a zoo ``ZooForCausalLM`` (any mixer or hybrid) and its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8, max_length: int = 2048,
                 progress: bool = True) -> None:
        require_lm_eval()
        super().__init__()
        if batch_size < 1 or max_length < 2:
            raise EvalError(f"batch_size must be >= 1 and max_length >= 2 (got {batch_size}, {max_length}).")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.progress = progress
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.prefix_id = int(prefix if prefix is not None else 0)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.prefix_id

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live."""
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        """Name used by lm-eval's request cache."""
        return type(self.tokenizer).__name__

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        from zoo.finetune import encode_documents

        return list(encode_documents([text], self.tokenizer)[0])

    # ----- scoring -----------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, items: list[tuple[list[int], list[int]]], desc: str = "scoring") -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), greedy?)`` for each ``(context_ids, continuation_ids)`` pair."""
        order = sorted(range(len(items)), key=lambda i: -(len(items[i][0]) + len(items[i][1])))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(items)
        bar = tqdm(total=len(items), desc=desc, disable=not self.progress, dynamic_ncols=True)
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            rows, conts = [], []
            for i in idx:
                ctx, cont = items[i]
                full = (list(ctx) + list(cont))[-(self.max_length + 1) :]
                n_cont = min(len(cont), len(full) - 1)  # a continuation longer than the window is scored in part
                rows.append(full[:-1])
                conts.append(full[len(full) - n_cont :] if n_cont else [])
            T = max(len(r) for r in rows)
            x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
            mask = torch.zeros(len(rows), T, dtype=torch.long)
            for j, r in enumerate(rows):
                x[j, : len(r)] = torch.tensor(r)
                mask[j, : len(r)] = 1
            logits = self.model(input_ids=x.to(self.device), attention_mask=mask.to(self.device)).logits
            logp = F.log_softmax(logits.float(), -1)
            for j, i in enumerate(idx):
                cont = conts[j]
                if not cont:
                    out[i] = (0.0, True)
                    continue
                n = len(rows[j])
                lp = logp[j, n - len(cont) : n]  # (len(cont), V): the positions predicting the continuation
                tgt = torch.tensor(cont, device=lp.device)
                ll = float(lp.gather(-1, tgt[:, None]).sum())
                out[i] = (ll, bool((lp.argmax(-1) == tgt).all()))
            bar.update(len(idx))
        bar.close()
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval: log-likelihood of each continuation given its context, and whether it is the greedy one."""
        items = []
        for req in requests:
            ctx, cont = req.args[0], req.args[1]
            n_space = len(ctx) - len(ctx.rstrip())  # trailing spaces belong to the continuation (as HFLM does)
            if n_space:
                ctx, cont = ctx[:-n_space], ctx[-n_space:] + cont
            items.append((self.encode(ctx) or [self.prefix_id], self.encode(cont)))
        return self.score(items, "loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """lm-eval: total log-likelihood of each string, scored in disjoint windows of ``max_length`` tokens."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        items, owner = [], []
        for k, req in enumerate(requests):
            windows = get_rolling_token_windows(
                token_list=self.encode(req.args[0]), prefix_token=self.prefix_id, max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(make_disjoint_window, windows):
                items.append((list(ctx), list(cont)))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self.score(items, "loglikelihood_rolling")):
            totals[k] += ll
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """lm-eval: continue each context greedily (or sampling, if asked) until a stop string or the token limit."""
        out = []
        for req in tqdm(requests, desc="generate_until", disable=not self.progress, dynamic_ncols=True):
            ctx, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            ids = (self.encode(ctx) or [self.prefix_id])[-max(self.max_length - max_new, 1) :]
            x = torch.tensor([ids], device=self.device)
            gen = self.model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                do_sample=do_sample and temperature > 0, temperature=temperature if temperature > 0 else None,
                pad_token_id=self.pad_id, eos_token_id=self.tokenizer.eos_token_id,
            )
            text = self.tokenizer.decode(gen[0, len(ids) :].tolist(), skip_special_tokens=True)
            cuts = [text.index(s) for s in until if s and s in text]
            out.append(text[: min(cuts)] if cuts else text)
        return out


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
    lm = ZooLM(model, tok, batch_size=batch_size, max_length=max_length, progress=progress)
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
