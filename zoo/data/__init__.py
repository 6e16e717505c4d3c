"""Training data: synthetic tasks (MQAR, copying, selective copying, induction) and local text files."""

from __future__ import annotations

from typing import Any

from zoo.data.base import IGNORE_INDEX, TokenDataset
from zoo.data.mqar import multiquery_ar
from zoo.data.synthetic import copying, induction, selective_copying
from zoo.data.text import load_text_task
from zoo.data.tokenizer import ByteTokenizer, load_tokenizer

TASKS = ("mqar", "copying", "selective_copying", "induction", "text")


def _generate(task: Any, n: int, stream: int) -> TokenDataset:
    seed = [int(task.seed), stream]  # independent train (0) and eval (1) streams of one seed
    common = {"vocab_size": task.vocab_size, "seq_len": task.seq_len, "seed": seed}
    if task.name == "mqar":
        return multiquery_ar(n, num_kv_pairs=task.num_kv_pairs, power_a=task.power_a, **common)
    if task.name == "copying":
        return copying(n, num_tokens=task.num_tokens, **common)
    if task.name == "selective_copying":
        return selective_copying(n, num_tokens=task.num_tokens, **common)
    return induction(n, **common)


def build_task(task: Any) -> tuple[TokenDataset, TokenDataset]:
    """``(train_dataset, eval_dataset)`` for a ``TaskConfig`` (or a dict of its fields)."""
    if isinstance(task, dict):
        from zoo.train.config import TaskConfig

        task = TaskConfig(**task)
    if task.name not in TASKS:
        raise ValueError(f"task.name: unknown task {task.name!r}; choose one of {', '.join(TASKS)}.")
    if task.name == "text":
        if not task.path:
            raise ValueError("task.path is required for task.name=text; set it to a local .txt/.jsonl/.csv/.parquet file.")
        return load_text_task(
            task.path,
            seq_len=task.seq_len,
            text_column=task.text_column,
            tokenizer=task.tokenizer,
            eval_path=task.eval_path,
            eval_fraction=task.eval_fraction,
        )
    return _generate(task, task.num_train, 0), _generate(task, task.num_test, 1)


__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "ByteTokenizer",
    "TokenDataset",
    "build_task",
    "copying",
    "induction",
    "load_text_task",
    "load_tokenizer",
    "multiquery_ar",
    "selective_copying",
]
