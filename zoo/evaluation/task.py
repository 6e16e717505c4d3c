"""A checkpoint on a zoo task (its own from ``zoo_run.yaml``, or another) and on passkey retrieval: what ``zoo eval``
prints, as functions that return the results."""

from __future__ import annotations

from pathlib import Path


def evaluate_checkpoint(checkpoint: str | Path, tasks: list[str] | tuple[str, ...] = (),
                        overrides: list[str] | None = None) -> dict:
    """Task loss and accuracy of a checkpoint (or a run directory's latest one).

    The task is the checkpoint's own (its ``zoo_run.yaml``) unless ``tasks`` names task YAMLs (or packaged task names
    such as ``mqar``) to merge over it; ``overrides`` are ``key.path=value`` strings. Returns ``{"checkpoint", "task",
    "loss", "accuracy", "examples"}``.
    """
    import zoo
    from zoo.config import task_path
    from zoo.data import build_task
    from zoo.loading import find_checkpoint, load_model
    from zoo.train.checkpoint import load_run_config
    from zoo.train.loop import check_vocab, evaluate, resolve_device

    ckpt = find_checkpoint(checkpoint)
    saved = load_run_config(ckpt) or {}
    base = {k: v for k, v in saved.items() if k in ("train", "task")}
    run = zoo.load_config([base, *[task_path(t) for t in tasks]], overrides)
    model = load_model(ckpt, causal_lm=True)
    _, eval_set = build_task(run.task)
    check_vocab(model.config.vocab_size, eval_set, run.task)
    device = resolve_device(run.train.device)
    model.to(device)
    res = evaluate(model, eval_set, batch_size=run.train.eval_batch_size or run.train.batch_size,
                   max_batches=run.train.eval_batches, device=device, precision=run.train.precision)
    return {"checkpoint": str(ckpt), "task": run.task.name, **res}


def passkey_checkpoint(checkpoint: str | Path, lengths: list[int], *, n_per_length: int = 5,
                       prefill_chunk_size: int = 2048) -> list[dict]:
    """Passkey retrieval accuracy of a checkpoint's text model at each prompt length (long prompts prefilled in
    chunks through the cache): one ``{"checkpoint", "task", "length", "accuracy", "n", ...}`` row per length."""
    from zoo.data.passkey import evaluate_passkey
    from zoo.loading import LoadError, find_checkpoint, load_model_and_tokenizer
    from zoo.train.loop import resolve_device

    ckpt = find_checkpoint(checkpoint)
    model, tok = load_model_and_tokenizer(ckpt, causal_lm=True)
    if len(tok) > model.config.vocab_size:
        raise LoadError(f"{ckpt} has vocab_size {model.config.vocab_size} < {len(tok)} tokens of its tokenizer; "
                        "passkey retrieval needs a text model.")
    model.eval().to(resolve_device("auto"))
    rows = evaluate_passkey(model, tok, lengths, n_per_length=n_per_length, prefill_chunk_size=prefill_chunk_size)
    return [{"checkpoint": str(ckpt), "task": "passkey", **row} for row in rows]
