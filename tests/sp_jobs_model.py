"""Model-level sequence-parallel jobs (run on every rank by tests/sp_harness.py): a model split over the group vs
the same model in one process — logits, loss and every parameter gradient, and the sequence length each mixer saw.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import zoo
from zoo.parallel import sequence as sp


def model_job(model: dict, L: int, B: int = 2, cu: list[int] | None = None, seed: int = 0, tiled: bool = False) -> dict:
    """``model`` is a model config dict (the YAML's ``model`` section); ``cu`` packs one row (then B = 1).

    Returns this rank's local logits and the reference slice, the loss, and every parameter's gradient summed over
    the group (the single-process gradient when sequence parallelism is exact), with the references.
    """
    torch.manual_seed(seed)
    net = zoo.build_model({**model, "loss_chunk_size": 4 if tiled else 0}).float().train()
    B = 1 if cu is not None else B
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, net.config.vocab_size, (B, L), generator=g)
    cu_t = torch.tensor(cu, dtype=torch.int32) if cu is not None else None
    out = net(input_ids=ids, labels=ids, cu_seqlens=cu_t, return_logits=True)
    out.loss.backward()
    ref_grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)

    seen: list[int] = []
    hooks = [block.mixer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
             for block in net.model.layers]
    shard = sp.SequenceShard(None, dist.get_rank(), dist.get_world_size(), L, cu_t)
    with sp.sequence_parallel(shard):
        sp_out = net(input_ids=shard.take(ids), labels=shard.take(ids), return_logits=True)
    sp_out.loss.backward()
    for h in hooks:
        h.remove()
    result = {"logits": sp_out.logits.detach(), "logits_ref": shard.take(out.logits.detach()),
              "loss": sp_out.loss.detach(), "loss_ref": out.loss.detach(), "seen": torch.tensor(seen)}
    for n, p in net.named_parameters():
        grad = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)
        result[f"grad:{n}"] = grad
        result[f"grad:{n}_ref"] = ref_grads.get(n, torch.zeros_like(p))
    return result
