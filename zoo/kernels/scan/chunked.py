"""The fast torch path of ``linear_scan``: a two-pass blocked scan with a hand-written backward.

The sequence is cut into ``n`` chunks of ``C ~ sqrt(L)`` steps, viewed as ``(B, n, C, D)``. Every
vectorised step works on one position of *all* chunks at once (a ``(B, n, D)`` slab):

1. pass 1 walks the ``C`` positions and keeps, per chunk, the state reached from zero and the total decay;
2. one step per chunk carries the true state across chunk boundaries (``n`` steps on ``(B, D)``);
3. pass 2 walks the ``C`` positions again from the carried states and writes ``h``.

So the Python loop has about ``3 sqrt(L) + 2 sqrt(L)`` iterations instead of ``L``, memory traffic is
two reads of ``a, b`` and one write of ``h``, and only multiplications and additions are used (no logs,
no divisions): zeros, negative and complex decays and sequences of any length are exact up to rounding.
The backward pass is the same scan run the other way over the incoming gradient, with ``da`` formed in
its second pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from zoo.kernels._dispatch import compute_dtype

Slab = Callable[[int], torch.Tensor]


def _addcmul_into(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = x + a * s`` in place; under ``torch.compile`` as a copy (Dynamo cannot trace ``out=`` into a strided view)."""
    if torch.compiler.is_compiling():
        return out.copy_(torch.addcmul(x, a, s))
    return torch.addcmul(x, a, s, out=out)


SLAB = 1 << 16  # elements of one (B, n, D) slab: ~256 KiB of float32 stays in cache as L grows


def _chunk_size(L: int, width: int = 1) -> int:
    """A chunk length for ``L`` steps of ``width = B * D`` channels.

    Near sqrt(L) (fewest Python steps), but long enough that a slab of all chunks' step c (``width * L / C``
    elements) stays near ``SLAB``: otherwise every step walks a slab strided across the whole tensor and the
    per-token cost grows with L. A divisor of L near the target when there is one (no padding), else a power of two.
    """
    target = max(1, round(math.sqrt(L)), -(-L * width // SLAB))
    target = min(target, L)
    for C in sorted(range(max(1, target // 2), 2 * target + 1), key=lambda c: abs(c - target)):
        if L % C == 0:
            return C
    return 1 << max(0, round(math.log2(target)))


def _chunked(x: torch.Tensor, C: int, fill: float) -> torch.Tensor:
    """``(B, L, D)`` -> ``(B, n, C, D)``, padding the end with ``fill`` when C does not divide L."""
    B, L, D = x.shape
    pad = -L % C
    if pad:
        x = torch.cat([x, x.new_full((B, pad, D), fill)], dim=1)
    return x.reshape(B, (L + pad) // C, C, D)


def _shifted(x4: torch.Tensor, c: int, step: int, edge: torch.Tensor) -> torch.Tensor:
    """Slab of x at time ``t + step`` (step = +-1) for position c of every chunk; ``edge (B, D)`` past the ends."""
    C = x4.shape[2]
    c2 = c + step
    if 0 <= c2 < C:
        return x4[:, :, c2]
    if c2 == C:
        return torch.cat([x4[:, 1:, 0], edge[:, None]], dim=1)
    return torch.cat([edge[:, None], x4[:, :-1, C - 1]], dim=1)


def _two_pass(
    decay: Slab,
    inp: Slab,
    h0: torch.Tensor | None,
    out: torch.Tensor,
    reverse: bool,
    each: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Scan ``h = decay * h + inp`` over slabs; writes ``out (B, n, C, D)`` and returns the final state ``(B, D)``.

    ``decay(c)`` and ``inp(c)`` give the ``(B, n, D)`` slabs at chunk position c; ``each(c, h_slab)`` is
    called on every slab of the result in pass 2.
    """
    B, n, C, D = out.shape
    order = range(C - 1, -1, -1) if reverse else range(C)
    s = P = None  # per chunk: state reached from zero, product of decays
    for c in order:
        a_c, b_c = decay(c), inp(c)
        if s is None:
            s, P = b_c.clone(), a_c.resolve_conj().clone()
        else:
            _addcmul_into(b_c, a_c, s, s)
            P.mul_(a_c)
    chunks = list(range(n - 1, -1, -1) if reverse else range(n))
    carry = torch.empty_like(s)  # (B, n, D): the state entering each chunk
    carry[:, chunks[0]] = h0 if h0 is not None else 0
    for i, j in zip(chunks[:-1], chunks[1:]):
        _addcmul_into(s[:, i], P[:, i], carry[:, i], carry[:, j])
    state = torch.addcmul(s[:, chunks[-1]], P[:, chunks[-1]], carry[:, chunks[-1]])
    s = carry
    for c in order:
        s = _addcmul_into(inp(c), decay(c), s, out[:, :, c])
        if each is not None:
            each(c, s)
    return state


class _BlockedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, reverse):
        B, L, D = a.shape
        C = _chunk_size(L, B * D)
        a4, b4 = _chunked(a, C, 1.0), _chunked(b, C, 0.0)
        h4 = torch.empty(b4.shape, dtype=b4.dtype, device=b4.device)
        last = _two_pass(lambda c: a4[:, :, c], lambda c: b4[:, :, c], h0, h4, reverse)
        ctx.reverse = reverse
        ctx.save_for_backward(a4, h4, h0)
        h = h4.view(B, -1, D)[:, :L]
        return h, last

    @staticmethod
    def backward(ctx, dh, dh_last):
        a4, h4, h0 = ctx.saved_tensors
        B, n, C, D = a4.shape
        L = dh.shape[1]
        step = -1 if ctx.reverse else 1  # the gradient flows from t + step back to t
        ones = a4.new_ones(B, D)
        start = h0 if h0 is not None else a4.new_zeros(B, D)
        dy4 = _chunked(dh, C, 0.0)
        g4, da4 = torch.empty_like(h4), torch.empty_like(h4)  # h4 is contiguous, so are these

        def grad_a(c: int, g: torch.Tensor) -> None:  # da_t = g_t * conj(h_prev)
            h_prev = _shifted(h4, c, -step, start).conj()
            if torch.compiler.is_compiling():  # Dynamo cannot trace out= into a strided view
                da4[:, :, c] = g * h_prev
            else:
                torch.mul(g, h_prev, out=da4[:, :, c])

        # g_t = dy_t + conj(a_{t+step}) g_{t+step}: the same scan in the other direction, seeded with dh_last
        decay = lambda c: _shifted(a4, c, step, ones).conj()  # noqa: E731
        _two_pass(decay, lambda c: dy4[:, :, c], dh_last, g4, not ctx.reverse, grad_a)
        first = (slice(None), -1, C - 1) if ctx.reverse else (slice(None), 0, 0)  # the scan's first step (or pad)
        dh0 = a4[first].conj() * g4[first] if ctx.needs_input_grad[2] else None
        return da4.view(B, -1, D)[:, :L], g4.view(B, -1, D)[:, :L], dh0, None


def linear_scan_chunked(
    a: torch.Tensor,
    b: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked-scan ``linear_scan`` (validated inputs); same contract as ``linear_scan_ref``."""
    dtype = compute_dtype(a.dtype)
    a_c, b_c = a.to(dtype), b.to(dtype)
    h0_c = h0.to(dtype) if h0 is not None else None
    if cu_seqlens is None:
        h, last = _BlockedScan.apply(a_c, b_c, h0_c, reverse)
        return h.to(a.dtype), last.to(a.dtype)
    # Packed rows: the first step of every sequence (in scan order) forgets the past and starts from h0[n].
    cu = cu_seqlens.to(device=a.device, dtype=torch.long)
    starts, ends = cu[:-1], cu[1:] - 1
    entry, exit_ = (ends, starts) if reverse else (starts, ends)
    keep = torch.ones(a.shape[1], dtype=a_c.real.dtype, device=a.device).index_fill(0, entry, 0.0)[None, :, None]
    if h0_c is not None:
        seeds = torch.zeros_like(b_c[0]).index_copy(0, entry, h0_c)  # (L, D), h0[n] at sequence n's entry
        b_c = b_c + (1 - keep) * a_c * seeds[None]
    h, _ = _BlockedScan.apply(a_c * keep, b_c, None, reverse)
    return h.to(a.dtype), h[0, exit_].to(a.dtype)  # (1, L, D), (N, D)
