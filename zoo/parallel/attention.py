"""Softmax attention over a sequence split across a sequence group: all-gather K/V, Ulysses, sliding-window halos.

Queries stay on their rank; what differs is how each rank reaches the keys and values of the other slices:

* ``allgather`` (Llama 3's context parallelism): every rank all-gathers the group's K/V once per layer (causal
  layers keep the prefix up to their slice end) and attends with its local queries at their global positions.
  Works for any head count; each rank holds the full sequence's K/V of one layer (``2 · L · Hkv · K``), never the
  other activations.
* ``ulysses`` (DeepSpeed-Ulysses): an all-to-all turns the ``(L/P tokens, H heads)`` slice of q, k, v into
  ``(L tokens, H/P heads)``, each rank attends over the whole sequence for its heads, and a second all-to-all turns
  the output back. Needs ``n_heads`` and ``n_kv_heads`` divisible by P; moves ``4 · L · D / P`` elements per layer
  (q, k, v and o at full K/V width) — less than the all-gather, and no rank holds more than its heads' K/V.
* A causal sliding window of W needs only the ``W - 1`` keys/values before the slice: :func:`sequence.halo_before`
  (the whole sequence is never gathered), whichever mode is set.

Masks are built in the global frame: causal order by global token index, packed documents by the global document
ids of :class:`sequence.SequenceShard`. Rotary positions are the caller's (``shard.positions()``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from zoo.parallel import sequence as sp

__all__ = ["MODES", "check_mode", "attention_sp", "seq_to_heads", "heads_to_seq"]

#: the values of the attention mixer's ``sp`` setting
MODES = ("allgather", "ulysses", "ring")


def check_mode(mode: str) -> None:
    """Refuse an unknown or unavailable ``sp`` mode at construction (one sentence naming the fix)."""
    if mode == "ring":
        raise ValueError(
            "attention: sp=ring is not available (PyTorch's context_parallel ring attention covers only the CUDA "
            "flash/efficient/cuDNN SDPA ops, without the masks of packed documents); use sp: allgather or sp: ulysses."
        )
    if mode not in MODES:
        raise ValueError(f"attention: sp must be 'allgather' or 'ulysses' (how K/V reach the other slices); got {mode!r}.")


# --- Ulysses: all-to-all between the sequence and the heads -------------------------------------------------------


def _seq_to_heads(x: torch.Tensor, shard: sp.SequenceShard) -> torch.Tensor:
    """``(B, H, L/P, K)`` this slice, every head -> ``(B, H/P, L, K)`` every token, this rank's heads."""
    B, H, n, K = x.shape
    send = x.reshape(B, shard.size, H // shard.size, n, K).transpose(0, 1).contiguous()  # (P, B, H/P, L/P, K)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=shard.group)  # recv[j]: rank j's slice of our heads
    return recv.permute(1, 2, 0, 3, 4).reshape(B, H // shard.size, shard.size * n, K)


def _heads_to_seq(x: torch.Tensor, shard: sp.SequenceShard) -> torch.Tensor:
    """Inverse of :func:`_seq_to_heads`: ``(B, H/P, L, K)`` -> ``(B, H, L/P, K)``."""
    B, h, L, K = x.shape
    n = L // shard.size
    send = x.reshape(B, h, shard.size, n, K).permute(2, 0, 1, 3, 4).contiguous()  # (P, B, H/P, L/P, K)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=shard.group)  # recv[j]: our slice of rank j's heads
    return recv.transpose(0, 1).reshape(B, h * shard.size, n, K)


class _AllToAll(torch.autograd.Function):
    """Sequence <-> heads all-to-all; the backward is the opposite all-to-all of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shard: sp.SequenceShard, to_heads: bool) -> torch.Tensor:
        ctx.shard, ctx.to_heads = shard, to_heads
        sp.count("all_to_all", x.numel(), x.element_size())
        return _seq_to_heads(x, shard) if to_heads else _heads_to_seq(x, shard)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        return (_heads_to_seq(grad, ctx.shard) if ctx.to_heads else _seq_to_heads(grad, ctx.shard)), None, None


def seq_to_heads(x: torch.Tensor, shard: sp.SequenceShard) -> torch.Tensor:
    """``(B, H, L/P, K) -> (B, H/P, L, K)`` across the group (differentiable); H must be divisible by P."""
    return _AllToAll.apply(x, shard, True)


def heads_to_seq(x: torch.Tensor, shard: sp.SequenceShard) -> torch.Tensor:
    """``(B, H/P, L, K) -> (B, H, L/P, K)`` across the group (differentiable)."""
    return _AllToAll.apply(x, shard, False)


# --- the attention --------------------------------------------------------------------------------------------------


def _mask(qi: torch.Tensor, kj: torch.Tensor, *, causal: bool, window: int | None, shard: sp.SequenceShard):
    """Bool ``(len(qi), len(kj))`` (True = attend) for global query rows and key columns, or None when all attend."""
    q, k = qi[:, None], kj[None, :]
    keep = (k >= 0) & (k < shard.total)
    if causal:
        keep = keep & (k <= q)
    if window is not None:
        keep = keep & (q - k < window)
    docs = shard.global_doc_ids(qi.device)
    if docs is not None:
        keep = keep & (docs[qi][:, None] == docs[kj.clamp(0, shard.total - 1)][None, :])
    return None if bool(keep.all()) else keep


def _attend(q, k, v, qi, kj, *, causal: bool, window: int | None, shard: sp.SequenceShard) -> torch.Tensor:
    gqa = k.shape[1] != q.shape[1]
    square = qi.numel() == kj.numel() and int(qi[0]) == int(kj[0])  # queries and keys are the same tokens
    if shard.cu_seqlens is None and window is None and (square or not causal):
        # no packing, no window: SDPA's own causal rule (no dense L x L mask; Ulysses attends the whole sequence)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    mask = _mask(qi, kj, causal=causal, window=window, shard=shard)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _attend_window(q, k, v, qi, *, window: int, shard: sp.SequenceShard) -> torch.Tensor:
    """Causal sliding-window attention of the slice's queries over ``[halo, slice]`` keys (``window - 1`` + L/P).

    Query blocks of ``window`` rows see at most ``2 * window - 1`` keys, so time and memory grow linearly in the slice
    length (as in the single-process layer), not with its square.
    """
    n, W = q.shape[2], window
    kj = torch.arange(shard.start - (W - 1), shard.end, device=q.device)  # the global index of every key column
    if n <= W:
        return _attend(q, k, v, qi, kj, causal=True, window=W, shard=shard)
    outs = []
    for s in range(0, n, W):  # rows s .. e-1 see the keys of global rows qi[s] - W + 1 .. qi[e - 1]: columns s .. e+W-2
        e = min(s + W, n)
        outs.append(_attend(q[:, :, s:e], k[:, :, s : e + W - 1], v[:, :, s : e + W - 1], qi[s:e], kj[s : e + W - 1],
                            causal=True, window=W, shard=shard))
    return torch.cat(outs, 2)


def attention_sp(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: int | None, mode: str,
    shard: sp.SequenceShard,
) -> torch.Tensor:
    """Attention of this slice's queries over the whole sequence group's keys: q ``(B, H, L/P, K)``, k/v
    ``(B, Hkv, L/P, K)`` (rotary already applied at global positions) -> o ``(B, H, L/P, K)``."""
    dev = q.device
    qi = torch.arange(shard.start, shard.end, device=dev)
    if window is not None and causal:  # only the W - 1 keys before the slice: a halo, never the whole sequence
        kh, vh = (sp.halo_before(t, window - 1, shard, dim=2) for t in (k, v))
        return _attend_window(q, torch.cat([kh, k], 2), torch.cat([vh, v], 2), qi, window=window, shard=shard)
    if mode == "ulysses":
        H, Hkv = q.shape[1], k.shape[1]
        if H % shard.size or Hkv % shard.size:
            raise ValueError(
                f"attention: sp=ulysses splits the heads over the {shard.size} ranks, so n_heads={H} and "
                f"n_kv_heads={Hkv} must both be divisible by {shard.size}; use sp: allgather or a divisible head count."
            )
        qh, kh, vh = (seq_to_heads(t, shard) for t in (q, k, v))  # (B, H/P, L, K)
        every = torch.arange(shard.total, device=dev)
        return heads_to_seq(_attend(qh, kh, vh, every, every, causal=causal, window=window, shard=shard), shard)
    # all-gather of K/V; a causal layer keeps only the prefix that its queries can see
    end = shard.end if causal else shard.total
    kg, vg = (torch.cat(sp.all_gather(t, shard, kind="kv").unbind(0), dim=2)[:, :, :end] for t in (k, v))  # (B, Hkv, end, K)
    return _attend(q, kg, vg, qi, torch.arange(end, device=dev), causal=causal, window=window, shard=shard)
