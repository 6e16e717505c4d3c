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
    untiled ``lm_head`` + ``causal_lm_loss``. Nothing of size (N, V) is saved.

    The loss is a scalar, so its gradients are ``grad_out / count`` times fixed tensors: with ``eager_grad`` the
    forward forms them while each tile's logits are at hand (``softmax - onehot`` times ``weight`` and ``hidden``:
    three head matmuls in all, as untiled logits take, instead of four) and the backward only scales them. Without
    it (no gradient wanted, or float16, whose narrow range the recompute's early scaling protects) the backward
    recomputes each tile's logits.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                eager_grad: bool = False, with_preds: bool = True):
        """Returns the mean loss and, per row, the argmax of its logits (not differentiable; for accuracy; empty
        without ``with_preds``)."""
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        preds = torch.empty(hidden.shape[0] if with_preds else 0, dtype=torch.long, device=hidden.device)
        count = (targets != IGNORE_INDEX).sum()
        need_h, need_w = ctx.needs_input_grad[0] and eager_grad, ctx.needs_input_grad[1] and eager_grad
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        rows = min(chunk_size, hidden.shape[0])
        # one logits buffer for every tile, turned into the softmax in place: a fresh (chunk, V) tensor per tile (and
        # log_softmax's second one) costs page faults that measured ~10 % of the head on CPU
        raw_buf = hidden.new_empty(rows, weight.shape[0])
        f32_buf = raw_buf if raw_buf.dtype == torch.float32 else torch.empty(raw_buf.shape, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[s : s + chunk_size], targets[s : s + chunk_size]
            raw = torch.mm(h, weight.t(), out=raw_buf[: h.shape[0]])
            logits = raw if raw is f32_buf[: h.shape[0]] else f32_buf[: h.shape[0]].copy_(raw)  # (chunk, V) fp32
            if with_preds:
                preds[s : s + chunk_size] = logits.argmax(-1)
            total += _softmax_(logits, t, normalise=need_h or need_w)
            if not (need_h or need_w):
                continue
            grad = _softmax_minus_onehot(logits, t, 1.0).to(hidden.dtype)  # the backward scales by grad_out / count
            if need_h:
                torch.mm(grad, weight, out=grad_h[s : s + chunk_size])
            if need_w:
                if grad.dtype == torch.float32:
                    grad_w.addmm_(grad.t(), h)
                else:
                    grad_w += (grad.t() @ h).float()
        ctx.chunk_size, ctx.eager, ctx.weight_dtype = chunk_size, need_h or need_w, weight.dtype
        if ctx.eager:
            ctx.save_for_backward(grad_h, grad_w, count)
        else:
            ctx.save_for_backward(hidden, weight, targets, count)
        ctx.mark_non_differentiable(preds)
        return total / count, preds  # nan when nothing is labelled, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_preds=None):
        if ctx.eager:
            gh, gw, count = ctx.saved_tensors
            scale = grad_out.float() / count  # the same factor the recomputing backward applies
            grad_h = None if gh is None else (gh.float() * scale).to(gh.dtype)
            grad_w = None if gw is None else (gw * scale).to(ctx.weight_dtype)
            return grad_h, grad_w, None, None, None, None
        hidden, weight, targets, count = ctx.saved_tensors
        chunk = ctx.chunk_size
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = grad_out.float() / count
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h, t = hidden[s : s + chunk], targets[s : s + chunk]
                grad = _softmax_minus_onehot(F.linear(h, weight).float().softmax(-1), t, scale).to(hidden.dtype)
                if need_h:
                    grad_h[s : s + chunk] = grad @ weight
                if need_w:
                    grad_w += (grad.t() @ h).float()
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None, None


def _softmax_(logits: torch.Tensor, t: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """The summed cross-entropy of ``logits`` (chunk, V) fp32 against ``t`` (rows with target -100 left out), turning
    ``logits`` into its softmax in place (into unnormalised ``exp(logits - max)`` without ``normalise``).

    ``log z + max - logit_t`` per row, as ``log_softmax`` computes it (stable), with no second (chunk, V) tensor.
    """
    valid = t != IGNORE_INDEX
    rows = valid.nonzero().squeeze(1)
    m = logits.amax(-1, keepdim=True)
    target_logit = logits[rows, t[rows]]
    z = logits.sub_(m).exp_().sum(-1, keepdim=True)
    if normalise:
        logits.div_(z)
    return (z[rows, 0].log() + m[rows, 0] - target_logit).sum()


def _softmax_minus_onehot(p: torch.Tensor, t: torch.Tensor, scale) -> torch.Tensor:
    """``(p - onehot(t)) * scale`` in place on ``p`` (chunk, V), rows whose target is ignored zeroed: d loss / d logits."""
    valid = t != IGNORE_INDEX
    rows = valid.nonzero().squeeze(1)
    p[rows, t[rows]] -= 1.0
    if isinstance(scale, torch.Tensor) or scale != 1.0:
        p *= scale
    if rows.numel() < t.numel():  # only the ignored rows are written (a masked pass over the tile measured 9 ms)
        p.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)
    return p


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
    flat = hidden.reshape(-1, hidden.shape[-1])
    return tiled_linear_cross_entropy(flat, weight, targets, chunk_size=chunk_size, with_preds=False)[0]


def tiled_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk_size: int = 1024,
    with_preds: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``cross_entropy(F.linear(hidden, weight), targets)`` over targets != -100, and each row's argmax
    (an empty tensor with ``with_preds=False``, which skips computing it).

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
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    # gradients formed in the forward (no recompute) when a backward will want them; float16 keeps the recompute
    eager = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad) and dtype != torch.float16
    with torch.autocast(device_type, enabled=False):
        return TiledLinearCrossEntropy.apply(hidden, weight, targets, int(chunk_size), eager, with_preds)
