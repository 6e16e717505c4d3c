"""Multi-query associative recall (MQAR), generated as Zoology does (Arora et al. 2023).

An example is a context ``k1 v1 k2 v2 ...`` of ``num_kv_pairs`` pairs followed by a query region where
each key appears once more; the model must emit that key's value. Keys come from ``[1, V/2)``, values from
``[V/2, V)``, never repeated within an example; filler tokens are 0. Query gaps ``g`` (0-based) are drawn without
replacement with ``p(g) ∝ a·(g+1)^(a-1)`` over ``g < (L - 2·kv)/2``; the key sits at ``2·kv + 2·g`` and its value
is the label of the next position, so (HF convention, the model shifts labels) the value is predicted from the
key's position. Every other label is -100.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from zoo.data.base import IGNORE_INDEX, TokenDataset

_CHUNK = 16384  # rows generated at once: bounds memory for long sequences


def sample_without_replacement(rng: np.random.Generator, n: int, population: int, k: int) -> np.ndarray:
    """``(n, k)`` int64, each row ``k`` distinct values drawn uniformly from ``[0, population)`` in random order."""
    if k * k <= population:  # rows rarely collide: redraw whole rows until all are distinct (exactly uniform)
        out = rng.integers(0, population, size=(n, k))
        bad = np.arange(n)
        while bad.size:
            out[bad] = rng.integers(0, population, size=(bad.size, k))
            srt = np.sort(out[bad], axis=1)
            bad = bad[(srt[:, 1:] == srt[:, :-1]).any(axis=1)]
        return out
    out = np.empty((n, k), dtype=np.int64)
    for j in range(k):
        r = rng.integers(0, population - j, size=n)
        taken = np.sort(out[:, :j], axis=1)
        for c in range(j):  # r-th free value: step over every taken value at or below it, in increasing order
            r += r >= taken[:, c]
        out[:, j] = r
    return out


def weighted_sample_without_replacement(rng: np.random.Generator, n: int, p: np.ndarray, k: int) -> np.ndarray:
    """``(n, k)`` indices into ``p`` drawn without replacement, each draw ∝ ``p`` over the indices left.

    Gumbel-top-k: the ``k`` largest of ``log p + Gumbel`` are distributed as ``k`` successive weighted draws.
    """
    keys = np.log(p)[None, :] + rng.gumbel(size=(n, p.shape[0]))
    top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def check_mqar_args(vocab_size: int, seq_len: int, num_kv_pairs: int, power_a: float) -> None:
    """Raise ``ValueError`` naming the ``task.*`` key and the fix when MQAR cannot be built from these values."""
    if num_kv_pairs < 1:
        raise ValueError(f"task.num_kv_pairs must be at least 1 (got {num_kv_pairs}); set e.g. task.num_kv_pairs=4.")
    if seq_len % 2:
        raise ValueError(f"task.seq_len must be even for MQAR (got {seq_len}); set e.g. task.seq_len={seq_len + 1}.")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"task.seq_len={seq_len} leaves no room for {num_kv_pairs} pairs and their queries (needs "
            f"seq_len >= 4 * num_kv_pairs = {4 * num_kv_pairs}); raise task.seq_len or lower task.num_kv_pairs."
        )
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(
            f"task.vocab_size={vocab_size} has {max(vocab_size // 2 - 1, 0)} keys for {num_kv_pairs} distinct pairs; "
            f"set task.vocab_size >= {2 * num_kv_pairs + 2}."
        )
    if not power_a > 0:
        raise ValueError(f"task.power_a must be positive (got {power_a}); Zoology uses 0.01.")


def _mqar_chunk(rng: np.random.Generator, n: int, vocab_size: int, seq_len: int, kv: int, p: np.ndarray):
    half = vocab_size // 2
    keys = sample_without_replacement(rng, n, half - 1, kv) + 1  # (n, kv) in [1, V/2)
    values = sample_without_replacement(rng, n, vocab_size - half, kv) + half  # (n, kv) in [V/2, V)
    ctx = 2 * kv
    input_ids = np.zeros((n, seq_len), dtype=np.int64)
    input_ids[:, 0:ctx:2] = keys
    input_ids[:, 1:ctx:2] = values
    gaps = weighted_sample_without_replacement(rng, n, p, kv)  # (n, kv) 0-based gaps, query j asks key j
    qpos = ctx + 2 * gaps
    np.put_along_axis(input_ids, qpos, keys, axis=1)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, qpos + 1, values, axis=1)
    return input_ids, labels


def multiquery_ar(
    num_examples: int,
    *,
    vocab_size: int = 8192,
    seq_len: int = 64,
    num_kv_pairs: int = 4,
    power_a: float = 0.01,
    seed: int | Sequence[int] = 0,
) -> TokenDataset:
    """Generate ``num_examples`` MQAR examples of length ``seq_len``; the same seed gives the same data."""
    check_mqar_args(vocab_size, seq_len, num_kv_pairs, power_a)
    rng = np.random.default_rng(seed)
    space = (seq_len - 2 * num_kv_pairs) // 2
    i = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * i ** (power_a - 1)
    p = p / p.sum()
    parts = [
        _mqar_chunk(rng, min(_CHUNK, num_examples - s), vocab_size, seq_len, num_kv_pairs, p)
        for s in range(0, num_examples, _CHUNK)
    ]
    if not parts:
        return TokenDataset(np.zeros((0, seq_len), np.int64), np.zeros((0, seq_len), np.int64))
    return TokenDataset(np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts]))
