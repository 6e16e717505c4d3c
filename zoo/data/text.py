"""Language-modelling data from local files, read through HF ``datasets`` and cut into fixed-length blocks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from zoo.data.base import TokenDataset
from zoo.data.tokenizer import ByteTokenizer, load_tokenizer

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".text": "text",
           ".md": "text"}


def _data_files(path: str, key: str) -> tuple[str, list[str]]:
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in FORMATS)
        if not files:
            raise FileNotFoundError(
                f"{key}: folder {path!r} holds no {'/'.join(sorted(FORMATS))} files; point it at a data file."
            )
    elif p.is_file():
        files = [str(p)]
    else:
        raise FileNotFoundError(f"{key}: {path!r} does not exist; point it at a local text/json/jsonl/csv/parquet file.")
    formats = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in formats:
        raise ValueError(
            f"{key}: cannot tell the format of {path!r} from its extension; use one of {', '.join(FORMATS)}."
        )
    if len(formats) > 1:
        raise ValueError(f"{key}: folder {path!r} mixes formats {sorted(formats)}; keep one format per folder.")
    return formats.pop(), files


def read_texts(path: str, text_column: str = "text", key: str = "task.path") -> list[str]:
    """The ``text_column`` of every row of a local file (or folder of files), in order."""
    import datasets

    fmt, files = _data_files(path, key)
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        ds = datasets.load_dataset(fmt, data_files=files, split="train")
    finally:
        if was_enabled:
            datasets.utils.logging.enable_progress_bar()
    column = "text" if fmt == "text" else text_column
    if column not in ds.column_names:
        raise ValueError(
            f"task.text_column: column {column!r} is not in {path!r}; its columns are "
            f"{', '.join(ds.column_names)}. Set task.text_column to one of them."
        )
    return [str(t) for t in ds[column] if t is not None]


def tokenize_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """All texts as one id stream, each document followed by the tokenizer's eos id (when it has one)."""
    eos = tokenizer.eos_token_id
    if isinstance(tokenizer, ByteTokenizer):  # fast path: the ids are the UTF-8 bytes
        parts: list[np.ndarray] = []
        for t in texts:
            parts.append(np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64))
            if eos is not None:
                parts.append(np.array([eos], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = []
    for row in ids:
        out.extend(row)
        if eos is not None:
            out.append(eos)
    return np.asarray(out, dtype=np.int64)


def blocks(ids: np.ndarray, seq_len: int) -> TokenDataset:
    """Cut an id stream into ``len(ids) // seq_len`` blocks; labels are the inputs (the model shifts them)."""
    n = len(ids) // seq_len
    x = ids[: n * seq_len].reshape(n, seq_len)
    return TokenDataset(x, x.copy())


def load_text_task(
    path: str,
    *,
    seq_len: int,
    text_column: str = "text",
    tokenizer: str | PreTrainedTokenizerBase = "byte",
    eval_path: str | None = None,
    eval_fraction: float = 0.05,
) -> tuple[TokenDataset, TokenDataset]:
    """``(train, eval)`` block datasets from local files; eval is ``eval_path`` or the last blocks of ``path``."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    train_ids = tokenize_texts(read_texts(path, text_column), tok)
    if eval_path is not None:
        train = blocks(train_ids, seq_len)
        evalset = blocks(tokenize_texts(read_texts(eval_path, text_column, "task.eval_path"), tok), seq_len)
    else:
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"task.eval_fraction must be in [0, 1) (got {eval_fraction}); e.g. 0.05.")
        allb = blocks(train_ids, seq_len)
        n_eval = min(max(1, round(eval_fraction * len(allb))), len(allb) - 1) if eval_fraction > 0 else 0
        cut = len(allb) - n_eval
        train = TokenDataset(allb.input_ids[:cut], allb.labels[:cut])
        evalset = TokenDataset(allb.input_ids[cut:], allb.labels[cut:])
    if len(train) == 0:
        raise ValueError(
            f"task.path: {path!r} gives {len(train_ids)} tokens, not enough for two blocks of task.seq_len={seq_len}; "
            "add text or lower task.seq_len."
        )
    return train, evalset
