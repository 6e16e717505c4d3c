"""Sequence-parallel jobs for attention, S4 and Hydra (run on every rank by tests/sp_harness.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import zoo
from zoo.parallel import sequence as sp


def refusal_job(model: dict, L: int) -> dict:
    """Build ``model`` and run a split forward; returns the ValueError message this rank raised ("" if none)."""
    net = zoo.build_model(model).float()
    ids = torch.randint(0, net.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(0))
    shard = sp.SequenceShard(None, dist.get_rank(), dist.get_world_size(), L)
    try:
        with sp.sequence_parallel(shard):
            net(input_ids=shard.take(ids), labels=shard.take(ids))
    except ValueError as err:
        return {"error": str(err)}
    return {"error": ""}


def comm_job(model: dict, L: int, B: int = 2) -> dict:
    """Elements this rank received per collective kind in one split forward (``sequence.count_communication``)."""
    torch.manual_seed(0)
    net = zoo.build_model(model).float()
    ids = torch.randint(0, net.config.vocab_size, (B, L), generator=torch.Generator().manual_seed(0))
    shard = sp.SequenceShard(None, dist.get_rank(), dist.get_world_size(), L)
    with sp.sequence_parallel(shard), sp.count_communication() as counts:
        net(input_ids=shard.take(ids), labels=shard.take(ids))
    return {kind: torch.tensor(v) for kind, v in counts.items()}
