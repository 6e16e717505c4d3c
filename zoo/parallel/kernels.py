"""Sequence-parallel forms of the state-carrying kernels: each public kernel routes here under an active shard.

Every wrapper runs the plain kernel on this rank's slice (inside :func:`zoo.parallel.sequence.local`) through
:func:`zoo.parallel.sequence.lasp` (states) or a halo (convolutions), so its outputs and gradients equal the
unsplit kernel's. A wrapper takes the kernel's own arguments; ``cu_seqlens`` is the slice's local packing (the
model passes ``shard.local_cu_seqlens``). A carried-in initial state is refused: under sequence parallelism the
state at a slice start is the one composed from the earlier ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.kernels._dispatch import compute_dtype
from zoo.packing import seq_ids
from zoo.parallel import sequence as sp


def _no_initial_state(op: str, state) -> None:
    if state is not None:
        raise ValueError(
            f"{op}: under sequence parallelism a slice's initial state comes from the earlier ranks; do not pass one "
            "(decode or continue from a cache in one process)."
        )


def _rows(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    return x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1


def linear_scan_sp(a, b, h0, *, reverse: bool, cu_seqlens, backend, shard: sp.SequenceShard):
    """:func:`zoo.kernels.linear_scan` over a sequence split across ``shard``'s group (diagonal LASP-2)."""
    from zoo.kernels.scan import linear_scan

    _no_initial_state("linear_scan", h0)
    rows = _rows(a, cu_seqlens)

    def run(init):
        with sp.local():
            return linear_scan(a, b, init, reverse=reverse, cu_seqlens=cu_seqlens, backend=backend)

    def transition(carry_in):
        init = a.new_zeros(rows, a.shape[-1])
        if carry_in is not None:
            init[carry_in] = 1
        with sp.local():
            return linear_scan(a, torch.zeros_like(b), init, reverse=reverse, cu_seqlens=cu_seqlens, backend=backend)[1]

    carry_in, carry_out = sp.carry_rows(shard, rows, reverse=reverse)
    return sp.lasp(run, transition, carry_in=carry_in, carry_out=carry_out, shard=shard, reverse=reverse)


def _segment_sum(x: torch.Tensor, cu_seqlens: torch.Tensor | None, rows: int) -> torch.Tensor:
    """``x (B, L, *F)`` summed over each state row's steps: over L per batch row, or per document of ``cu_seqlens``."""
    if cu_seqlens is None:
        return x.sum(1)
    doc = seq_ids(cu_seqlens.to(x.device), x.shape[1])
    return x.new_zeros(rows, *x.shape[2:]).index_add(0, doc, x[0])


def _at_rows(carry_in: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    """``t (rows, ...)`` at the rows ``carry_in`` that start from the carried state, zeros elsewhere."""
    keep = torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)
    if carry_in is not None:
        keep[carry_in.to(t.device)] = True
    return torch.where(keep.view(-1, *([1] * (t.dim() - 1))), t, torch.zeros_like(t))


def decay_transition(log_decay: torch.Tensor, carry_in: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                     rows: int) -> torch.Tensor:
    """Total transition of a diagonal recurrence over the slice in closed form, ``(rows, *F)``.

    ``log_decay (B, L, *F)`` is the log of every step's decay. A row's transition is ``exp`` of its summed log-decay
    (over its document with ``cu_seqlens``) where the row starts from the carried state (``carry_in``), zeros
    elsewhere (a document that starts on this rank passes no earlier state on): the recurrence run with zero inputs
    from ones at ``carry_in``, without a kernel pass.
    """
    return _at_rows(carry_in, _segment_sum(log_decay, cu_seqlens, rows).exp())


def _carry(shard: sp.SequenceShard, rows: int, carry) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``carry`` (given ``(carry_in, carry_out)`` rows) or the shard's default rows for ``rows`` states."""
    return sp.carry_rows(shard, rows) if carry is None else carry


def selective_scan_sp(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend, *,
                      initial_state, cu_seqlens, shard: sp.SequenceShard):
    """:func:`zoo.kernels.selective_scan` over a sequence split across ``shard``'s group (diagonal LASP-2).

    The transition is ``exp(A * sum(dt))`` per row, in closed form. The kernel takes no initial or final state
    with ``cu_seqlens``, so a packed slice runs as up to three pieces: its first document (from the carried state),
    the documents between (packed) and its last document (whose final state is passed on).
    """
    from zoo.kernels.selective import selective_scan

    _no_initial_state("selective_scan", initial_state)
    L = u.shape[-1]

    def scan(lo: int, hi: int, init, cu=None):
        def part(t):
            return None if t is None else t[..., lo:hi]

        with sp.local():
            return selective_scan(part(u), part(delta), A, part(B), part(C), D, part(z), delta_bias, delta_softplus,
                                  cu is None, backend, initial_state=init, cu_seqlens=cu)

    if cu_seqlens is None:
        rows = u.shape[0]

        def run(init):
            return scan(0, L, init)
    else:
        cu = [int(c) for c in cu_seqlens.tolist()]
        rows = len(cu) - 1

        def run(init):
            first = None if init is None else init[:1]
            if rows == 1:
                return scan(0, L, first)
            pieces = [scan(0, cu[1], first)[0]]
            if cu[-2] > cu[1]:
                inner = torch.tensor(cu[1:-1], device=cu_seqlens.device) - cu[1]
                pieces.append(scan(cu[1], cu[-2], None, inner))
            out, h = scan(cu[-2], L, None)
            final = torch.cat([h.new_zeros(rows - 1, *h.shape[1:]), h])  # only the last document's state goes on
            return torch.cat([*pieces, out], dim=-1), final

    def transition(carry_in):
        f = compute_dtype(u.dtype)
        dt = delta.to(f)
        if delta_bias is not None:
            dt = dt + delta_bias.to(f)[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        summed = _segment_sum(dt.transpose(1, 2), cu_seqlens, rows)  # (rows, E)
        return _at_rows(carry_in, torch.exp(summed[..., None] * A.to(f)))  # (rows, E, N)

    carry_in, carry_out = sp.carry_rows(shard, rows)
    out, final = sp.lasp(run, transition, carry_in=carry_in, carry_out=carry_out, shard=shard)
    return (out, final) if return_last_state else out


def chunk_gla_sp(q, k, v, g, *, scale, initial_state, output_final_state, cu_seqlens, chunk_size, backend,
                 shard: sp.SequenceShard, carry=None):
    """:func:`zoo.kernels.chunk_gla` over a sequence split across ``shard``'s group (LASP-2, elementwise decay).

    The transition is ``exp`` of the summed log-decay per head (and key dim), broadcast over V: ``(N, H, K|1, 1)``.
    ``carry`` overrides the ``(carry_in, carry_out)`` rows of :func:`zoo.parallel.sequence.carry_rows` (MoM's
    per-memory streams).
    """
    from zoo.kernels.gla import chunk_gla

    _no_initial_state("chunk_gla", initial_state)

    def run(init):
        with sp.local():
            return chunk_gla(q, k, v, g, scale=scale, initial_state=init, output_final_state=True,
                             cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend)

    o, final = gla_lasp(run, g, cu_seqlens=cu_seqlens, shard=shard, carry=carry)
    return o, (final if output_final_state else None)


def gla_lasp(run, g: torch.Tensor, *, cu_seqlens, shard: sp.SequenceShard, carry=None):
    """:func:`zoo.parallel.sequence.lasp` of a gated-linear-attention recurrence (state ``(N, H, K, V)``).

    ``run(initial_state)`` is any form of it on the slice (``chunk_gla``, RetNet's parallel form) returning
    ``(o, final_state)``; ``g (B, L, H)`` or ``(B, L, H, K)`` its log-decay, from which the transition is formed.
    """
    rows = _rows(g, cu_seqlens)
    ct = torch.promote_types(g.dtype, torch.float32)
    log_decay = g.to(ct) if g.dim() == 4 else g.to(ct)[..., None]  # (B, L, H, K|1)

    def transition(carry_in):
        return decay_transition(log_decay, carry_in, cu_seqlens, rows)[..., None]  # (N, H, K|1, 1)

    carry_in, carry_out = _carry(shard, rows, carry)
    return sp.lasp(run, transition, carry_in=carry_in, carry_out=carry_out, shard=shard)


def chunk_delta_rule_sp(q, k, v, beta, g, *, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
                        backend, shard: sp.SequenceShard, carry=None):
    """:func:`zoo.kernels.chunk_delta_rule` over a sequence split across ``shard``'s group (LASP-2, K x K transition).

    The transition ``prod exp(g) (I - beta k k^T)`` is the same kernel run with zero values of width K from the
    identity; the states compose as ``T @ S``. ``carry`` as in :func:`chunk_gla_sp`.
    """
    from zoo.kernels.delta_rule import chunk_delta_rule

    _no_initial_state("chunk_delta_rule", initial_state)
    rows = _rows(q, cu_seqlens)
    H, K = q.shape[2], q.shape[3]
    kw = dict(scale=scale, output_final_state=True, cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend)

    def run(init):
        with sp.local():
            return chunk_delta_rule(q, k, v, beta, g, initial_state=init, **kw)

    def transition(carry_in):
        ct = torch.promote_types(q.dtype, torch.float32)
        eye = torch.eye(K, dtype=ct, device=q.device).expand(rows, H, K, K)
        with sp.local():
            return chunk_delta_rule(q, k, v.new_zeros(k.shape), beta, g, initial_state=_at_rows(carry_in, eye), **kw)[1]

    carry_in, carry_out = _carry(shard, rows, carry)
    o, final = sp.lasp(run, transition, carry_in=carry_in, carry_out=carry_out, shard=shard, matrix=True)
    return o, (final if output_final_state else None)


def causal_conv1d_sp(x, weight, bias, activation, *, initial_states, cu_seqlens, return_final_states, backend,
                     shard: sp.SequenceShard):
    """:func:`zoo.kernels.causal_conv1d` over a sequence split across ``shard``'s group: a halo of W-1 inputs.

    Unpacked, the halo is the kernel's ``initial_states``; packed, it is prepended to the slice and joins its first
    document (zeros where that document starts on this rank), and its outputs are dropped.
    """
    from zoo.kernels.conv import causal_conv1d

    _no_initial_state("causal_conv1d", initial_states)
    W1 = weight.shape[1] - 1
    halo = sp.halo_before(x, W1, shard, dim=2)  # (B, E, W-1): the inputs before this slice, same document
    with sp.local():
        if cu_seqlens is None:
            return causal_conv1d(x, weight, bias, activation, initial_states=halo,
                                 return_final_states=return_final_states, backend=backend)
        cu = cu_seqlens.to(torch.long)
        ext = torch.cat([cu[:1], cu[1:] + W1])
        y = causal_conv1d(torch.cat([halo, x], dim=2), weight, bias, activation, cu_seqlens=ext,
                          return_final_states=return_final_states, backend=backend)
        return y[..., W1:]
