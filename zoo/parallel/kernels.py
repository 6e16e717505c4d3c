"""Sequence-parallel forms of the state-carrying kernels: each public kernel routes here under an active shard.

Every wrapper runs the plain kernel on this rank's slice (inside :func:`zoo.parallel.sequence.local`) through
:func:`zoo.parallel.sequence.lasp` (states) or a halo (convolutions), so its outputs and gradients equal the
unsplit kernel's. A wrapper takes the kernel's own arguments; ``cu_seqlens`` is the slice's local packing (the
model passes ``shard.local_cu_seqlens``). A carried-in initial state is refused: under sequence parallelism the
state at a slice start is the one composed from the earlier ranks.
"""

from __future__ import annotations

import torch

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
