"""Copying, selective copying and induction-head tasks (as in the Mamba paper's synthetic suite).

Token 0 is filler/noise, token 1 the separator (copying) or trigger (induction); data tokens come from
``[2, vocab_size)``. Labels follow the HF convention (the model shifts them), ``-100`` everywhere but the answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from zoo.data.base import IGNORE_INDEX, TokenDataset

FILLER, SEP = 0, 1


def _check_vocab(vocab_size: int) -> None:
    if vocab_size < 3:
        raise ValueError(f"task.vocab_size must be at least 3 (0 filler, 1 separator, data from 2; got {vocab_size}).")


def _copy_layout(data: np.ndarray, positions: np.ndarray, seq_len: int) -> TokenDataset:
    """Place ``data`` at ``positions`` of the context, then ``SEP`` and the data again as the answer."""
    n, k = data.shape
    input_ids = np.full((n, seq_len), FILLER, dtype=np.int64)
    np.put_along_axis(input_ids, positions, data, axis=1)
    start = seq_len - k  # the answer occupies the last k positions; SEP sits just before it
    input_ids[:, start - 1] = SEP
    input_ids[:, start:] = data
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    labels[:, start:] = data  # predicted from SEP and then from each previous answer token
    return TokenDataset(input_ids, labels)


def copying(
    num_examples: int, *, vocab_size: int = 16, seq_len: int = 64, num_tokens: int = 16, seed: int | Sequence[int] = 0
) -> TokenDataset:
    """Copy ``num_tokens`` tokens across a gap of filler: ``x 0…0 SEP x``; the answer is the second ``x``."""
    _check_vocab(vocab_size)
    if 2 * num_tokens + 1 > seq_len:
        raise ValueError(
            f"task.seq_len={seq_len} cannot hold {num_tokens} tokens, a separator and their copy; "
            f"set task.seq_len >= {2 * num_tokens + 1} or lower task.num_tokens."
        )
    rng = np.random.default_rng(seed)
    data = rng.integers(2, vocab_size, size=(num_examples, num_tokens))
    positions = np.broadcast_to(np.arange(num_tokens), (num_examples, num_tokens))
    return _copy_layout(data, positions, seq_len)


def selective_copying(
    num_examples: int, *, vocab_size: int = 16, seq_len: int = 64, num_tokens: int = 16, seed: int | Sequence[int] = 0
) -> TokenDataset:
    """``num_tokens`` tokens scattered at random positions among filler, then ``SEP`` and the tokens in order."""
    _check_vocab(vocab_size)
    ctx = seq_len - num_tokens - 1
    if ctx < num_tokens:
        raise ValueError(
            f"task.seq_len={seq_len} cannot hold {num_tokens} scattered tokens, a separator and their copy; "
            f"set task.seq_len >= {2 * num_tokens + 1} or lower task.num_tokens."
        )
    rng = np.random.default_rng(seed)
    data = rng.integers(2, vocab_size, size=(num_examples, num_tokens))
    positions = np.sort(np.argsort(rng.random((num_examples, ctx)), axis=1)[:, :num_tokens], axis=1)
    return _copy_layout(data, positions, seq_len)


def induction(
    num_examples: int, *, vocab_size: int = 16, seq_len: int = 64, seed: int | Sequence[int] = 0
) -> TokenDataset:
    """Random tokens with one trigger ``1`` followed by a target; the sequence ends with the trigger again and
    the label of the last position is the target (predicted from the final trigger)."""
    _check_vocab(vocab_size)
    if seq_len < 4:
        raise ValueError(f"task.seq_len must be at least 4 for induction (got {seq_len}); set e.g. task.seq_len=64.")
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(2, vocab_size, size=(num_examples, seq_len))
    pos = rng.integers(0, seq_len - 3, size=num_examples)  # trigger and target stay clear of the final pair
    rows = np.arange(num_examples)
    target = input_ids[rows, pos + 1]
    input_ids[rows, pos] = SEP
    input_ids[:, -2] = SEP
    input_ids[:, -1] = target
    labels = np.full((num_examples, seq_len), IGNORE_INDEX, dtype=np.int64)
    labels[:, -1] = target
    return TokenDataset(input_ids, labels)
