"""Multi-process training on PyTorch's own stack: process groups, DDP, FSDP2 and full-state-dict gathering.

Launch with ``torchrun`` (or ``accelerate launch``, which sets the same environment): ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` select the process group (gloo on CPU, nccl on CUDA). Without
them everything here is a no-op and the run is a plain single process. ``zoo train`` and ``zoo finetune`` share
the rank helpers (:func:`is_main`, :func:`barrier`), so one rule holds for both: rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

DATA_MODES = ("none", "ddp", "fsdp")


def env_world_size() -> int:
    """The world size the launcher asked for (1 without a launcher)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files and prints."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def check_parallel(parallel: dict) -> dict:
    """Validate ``train.parallel`` (``data: none|ddp|fsdp``, ``sequence: P``) and fill its defaults."""
    if not isinstance(parallel, dict):
        raise ValueError(f"train.parallel must be a mapping like {{data: ddp, sequence: 1}} (got {parallel!r}).")
    unknown = sorted(set(parallel) - {"data", "sequence"})
    if unknown:
        raise ValueError(f"train.parallel.{unknown[0]}: unknown key; allowed: data, sequence.")
    data = parallel.get("data")
    if data is not None and data not in DATA_MODES:
        raise ValueError(f"train.parallel.data must be one of none, ddp, fsdp (got {data!r}).")
    seq = parallel.get("sequence", 1)
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise ValueError(f"train.parallel.sequence must be a positive integer (got {seq!r}).")
    return {"data": data, "sequence": seq}


@dataclass
class DistEnv:
    """Where this process stands: rank, world size, device, data-parallel mode, and whether it made the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    data: str = "none"
    owns_group: bool = False
    #: Ranks per sequence group (``train.parallel.sequence``): each sequence is split over ``sequence`` ranks.
    sequence: int = 1
    #: This rank's sequence group (None without sequence parallelism).
    seq_group: Any = None

    @property
    def seq_rank(self) -> int:
        """Index of this rank in its sequence group (which slice of every sequence it holds)."""
        return self.rank % self.sequence

    @property
    def data_rank(self) -> int:
        """Index of this rank's data-parallel group (which share of the global batch it holds)."""
        return self.rank // self.sequence

    @property
    def data_world(self) -> int:
        """Number of data-parallel groups (world size / sequence)."""
        return self.world_size // self.sequence

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def close(self) -> None:
        """Destroy the process group if :func:`setup` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup(device: torch.device, parallel: dict) -> DistEnv:
    """Join the process group the launcher describes (gloo on CPU, nccl on CUDA) and resolve the data mode.

    ``device`` is the one ``train.device`` resolved to; on CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    par = check_parallel(parallel)
    world = env_world_size()
    seq = par["sequence"]
    if world % seq:
        raise ValueError(
            f"train.parallel.sequence={seq} must divide the number of processes ({world}); launch a multiple of "
            f"{seq} processes (torchrun --nproc_per_node=...) or change train.parallel.sequence."
        )
    if world <= 1:  # ddp/fsdp over one process is the plain run (same maths): no process group needed
        return DistEnv(device=device, data="none")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "RANK" not in os.environ:
            raise RuntimeError(
                f"WORLD_SIZE={world} but RANK/MASTER_ADDR are not set; launch with torchrun or accelerate launch."
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        owns = True
    mode = par["data"] or "ddp"
    if mode == "none" and seq > 1:
        raise ValueError(
            "train.parallel.data=none cannot add up the gradient shares of a sequence group's ranks; use "
            "train.parallel.data=ddp or fsdp with train.parallel.sequence."
        )
    if mode == "none":
        raise ValueError(
            f"train.parallel.data=none but {world} processes were launched; use train.parallel.data=ddp or fsdp, "
            "or launch one process."
        )
    rank_, world_ = dist.get_rank(), dist.get_world_size()
    seq_group = None
    if seq > 1:  # every rank creates every group (new_group is collective), then keeps its own
        for g in range(world_ // seq):
            group = dist.new_group(list(range(g * seq, (g + 1) * seq)))
            if rank_ // seq == g:
                seq_group = group
    return DistEnv(rank=rank_, world_size=world_, local_rank=local_rank, device=device, data=mode, owns_group=owns,
                   sequence=seq, seq_group=seq_group)


def sequence_shard(env: DistEnv, total: int):
    """This rank's :class:`zoo.parallel.sequence.SequenceShard` of sequences of ``total`` tokens (None without SP)."""
    if env.sequence <= 1:
        return None
    from zoo.parallel.sequence import SequenceShard

    return SequenceShard(env.seq_group, env.seq_rank, env.sequence, total)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one (``model.model.layers`` for zoo models)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def wrap(module: nn.Module, env: DistEnv, blocks: list[nn.Module] | None = None) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` on each block, then on ``module`` as the root); unchanged for ``none``."""
    if env.data == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(module, device_ids=ids)
    if env.data == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # fully_shard replaces each parameter by a DTensor one under the same name; the no-weight-decay rule is
        # declared on the module classes (zoo.train.optim.no_decay_names), so it holds for the sharded model too.
        for block in blocks or []:
            fully_shard(block)
        fully_shard(module)
        return module
    return module


@contextlib.contextmanager
def no_sync(wrapped: nn.Module, env: DistEnv, skip: bool):
    """Skip the gradient all-reduce / reduce-scatter on a non-final accumulation micro-step when ``skip``."""
    if not skip or not env.distributed:
        yield
        return
    if env.data == "ddp":
        with wrapped.no_sync():
            yield
        return
    wrapped.set_requires_gradient_sync(False, recurse=True)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True, recurse=True)


def all_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """``t`` summed over the ranks (``torch.distributed.all_reduce``; returns ``t`` itself in one process)."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def full_model_state_dict(module: nn.Module, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """The full (unsharded, CPU) model state dict for saving under FSDP2; None otherwise (save the module as is).

    Every rank must call it (it gathers); only rank 0 gets a non-empty dict.
    """
    if env.data != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict:
    """The optimizer state to save: the plain ``state_dict()``, or the gathered full one under FSDP2 (all ranks call)."""
    if env.data != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict, env: DistEnv) -> None:
    """Restore what :func:`optimizer_state_dict` returned (every rank reads the same full state)."""
    if env.data != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def unwrap(module: Any) -> Any:
    """The module inside a DDP wrapper (FSDP2 shards in place, so there is nothing to unwrap)."""
    return getattr(module, "module", module)
