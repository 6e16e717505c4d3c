"""Sequence-parallel jobs for attention, S4 and Hydra (run on every rank by tests/sp_harness.py)."""

from __future__ import annotations

import torch.distributed as dist

import zoo
from zoo.parallel import sequence as sp


def refusal_job(model: dict, L: int) -> dict:
    """Build ``model`` and run a split forward; returns the error message every rank raised (or "")."""
    try:
        net = zoo.build_model(model).float()
        ids = torch_ids(net.config.vocab_size, L)
        shard = sp.SequenceShard(None, dist.get_rank(), dist.get_world_size(), L)
        with sp.sequence_parallel(shard):
            net(input_ids=shard.take(ids), labels=shard.take(ids))
    except ValueError as err:
        return {"error": str(err)}
    return {"error": ""}


def torch_ids(vocab: int, L: int):
    import torch

    return torch.randint(0, vocab, (1, L), generator=torch.Generator().manual_seed(0))
