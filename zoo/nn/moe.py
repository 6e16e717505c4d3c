"""Mixture-of-experts MLP (``mlp: moe``): top-k routing over SwiGLU experts with a Switch-style aux loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.nn.mlp import SwiGLU
from zoo.packing import count_ids
from zoo.parallel import sequence


class MoE(nn.Module):
    """Token-choice top-k MoE. Tokens are sorted by expert so each expert runs once on its own tokens.

    The load-balancing loss (Switch Transformer) ``scale * E * sum_e f_e * P_e`` — ``f_e`` the fraction of
    routed slots that went to expert e, ``P_e`` its mean router probability — is left in ``self.aux_loss``
    during training; the model adds it to the LM loss. No capacity limit: no token is dropped. Under sequence
    parallelism f and P are the whole sequence group's (see :meth:`_aux`), so the loss is the single-process one.
    """

    def __init__(
        self,
        d_model: int,
        *,
        hidden: int | None = None,
        n_experts: int = 8,
        top_k: int = 2,
        aux_loss_scale: float = 0.01,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"moe: top_k={top_k} must be between 1 and n_experts={n_experts}.")
        self.n_experts, self.top_k, self.aux_loss_scale = n_experts, top_k, aux_loss_scale
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d_model, hidden) for _ in range(n_experts))
        self.aux_loss: torch.Tensor | None = None
        self.last_topk: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (N, D)
        probs = F.softmax(self.router(xf).float(), dim=-1)  # (N, E) router in fp32
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        flat = experts.reshape(-1)  # (N*k,) slot -> expert
        order = flat.argsort(stable=True)
        counts = count_ids(flat, self.n_experts)
        out = torch.zeros_like(xf)
        for e, slots in enumerate(order.split(counts.tolist())):  # data-dependent sizes: a graph break under compile
            if slots.numel():
                tokens = slots // self.top_k
                out.index_add_(0, tokens, self.experts[e](xf[tokens]) * weights.reshape(-1)[slots, None])
        self.last_topk = experts.detach()
        self.aux_loss = self._aux(probs, counts) if self.training else None
        return out.reshape(shape)

    def _aux(self, probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Switch load-balancing loss from the router ``probs (N, E)`` and the routed slot ``counts (E,)``.

        Under sequence parallelism f and P are the sequence group's, from one all-reduce of the counts, the token
        count and the probability sums (as MoM's router); each rank back-propagates its own tokens' share.
        """
        shard = sequence.active()
        if shard is None:
            frac = counts.float() / (probs.shape[0] * self.top_k)
            return self.aux_loss_scale * self.n_experts * (frac * probs.mean(0)).sum()
        E = self.n_experts
        stats = sequence.sum_across(torch.cat([counts.to(probs.dtype), probs.new_tensor([probs.shape[0]]), probs.sum(0)]),
                                    shard)
        counts, n, psum = stats[:E], stats[E], stats[E + 1 :]
        return self.aux_loss_scale * E * (counts / (n * self.top_k) * psum / n).sum()
