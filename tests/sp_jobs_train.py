"""`zoo train` jobs for tests/test_sequence_parallel_train.py (run on every rank by tests/sp_harness.py)."""

from __future__ import annotations

import zoo
from zoo.train import train


def train_job(config: dict, out: str) -> dict:
    """Train ``config`` into ``out`` (every rank joins; rank 0 writes)."""
    train(zoo.load_config(config), out)
    return {}
