"""Next-token cross entropy: on full logits, or tiled over the sequence with the LM head inside the tiles.

The tiled loss (the MINI-SEQUENCE / Arctic-LST trick) never holds more than ``chunk_size`` rows of logits:
the forward computes each tile's logits, sums its cross entropy and drops them; the backward recomputes each
tile's logits and turns them into that tile's gradients at once. Memory for the head and loss goes from
``O(L * V)`` to ``O(chunk_size * V)``; the loss and gradients equal the untiled computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Targets aligned with the logits: ``targets[:, t] = labels[:, t + 1]``, the last position ignored.

    With ``cu_seqlens`` (packed documents in one row) the last token of each document predicts nothing, so no
    document's first token is predicted from the previous document.
    """
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    if cu_seqlens is not None:
        ends = cu_seqlens.to(labels.device).long()[1:-1] - 1  # last token of every sequence but the final one
        shifted[:, ends] = IGNORE_INDEX
    return shifted


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross entropy from full ``(B, L, V)`` logits: ``logits[:, t]`` predicts ``labels[:, t+1]``; -100 is ignored.

    With ``cu_seqlens`` the first token of each packed sequence is not predicted from the previous one.
    """
    shifted = shift_labels(labels.to(logits.device), cu_seqlens)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE_INDEX)


class TiledLinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(linear(hidden, weight).float(), targets)`` (mean over targets != -100), ``chunk_size`` rows at a time.

    ``hidden`` (N, D) and ``weight`` (V, D) share a dtype; logits are computed in it and the softmax in fp32, as the
    untiled ``lm_head`` + ``causal_lm_loss``. Nothing of size (N, V) is saved: the backward recomputes each tile.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        """Returns the mean loss and, per row, the argmax of its logits (not differentiable; for accuracy)."""
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        preds = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_size):
            logits = F.linear(hidden[s : s + chunk_size], weight).float()  # (chunk, V)
            total += F.cross_entropy(logits, targets[s : s + chunk_size], ignore_index=IGNORE_INDEX, reduction="sum")
            preds[s : s + chunk_size] = logits.argmax(-1)
        count = (targets != IGNORE_INDEX).sum()
        ctx.save_for_backward(hidden, weight, targets, count)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(preds)
        return total / count, preds  # nan when nothing is labelled, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_preds=None):
        hidden, weight, targets, count = ctx.saved_tensors
        chunk = ctx.chunk_size
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = grad_out.float() / count
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h, t = hidden[s : s + chunk], targets[s : s + chunk]
                grad = F.linear(h, weight).float().softmax(-1)  # (chunk, V): d loss_i / d logits_i = p - onehot
                valid = t != IGNORE_INDEX
                rows = valid.nonzero().squeeze(1)
                grad[rows, t[rows]] -= 1.0
                grad *= valid.unsqueeze(1) * scale
                grad = grad.to(hidden.dtype)
                if need_h:
                    grad_h[s : s + chunk] = grad @ weight
                if need_w:
                    grad_w += (grad.t() @ h).float()
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None


def tiled_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    *,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``causal_lm_loss(F.linear(hidden, weight), labels, cu_seqlens)`` without materialising the ``(B, L, V)`` logits.

    ``hidden`` is ``(B, L, D)`` (the final-norm output), ``weight`` the LM head's ``(V, D)``. Under autocast the head
    runs in the autocast dtype, as ``nn.Linear`` would.
    """
    targets = shift_labels(labels.to(hidden.device), cu_seqlens).reshape(-1)
    return tiled_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets, chunk_size=chunk_size)[0]


def tiled_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``cross_entropy(F.linear(hidden, weight), targets)`` over targets != -100, and each row's argmax.

    ``hidden`` (N, D), ``weight`` (V, D), ``targets`` (N,); at most ``chunk_size`` rows of logits exist at a time
    (forward and backward). Under autocast the head runs in the autocast dtype, as ``nn.Linear`` would.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1 (got {chunk_size}); use causal_lm_loss for the untiled loss.")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    with torch.autocast(device_type, enabled=False):
        return TiledLinearCrossEntropy.apply(hidden.to(dtype), weight.to(dtype), targets, int(chunk_size))
