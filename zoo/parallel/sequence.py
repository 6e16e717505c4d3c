"""Sequence parallelism: every sequence split into P contiguous slices, one per rank of a sequence group.

Rank ``r`` of a group of ``P`` holds tokens ``[r * L / P, (r + 1) * L / P)`` of every sequence; no rank ever holds
the whole sequence's activations. What a mixer needs from the other slices is exchanged here, with autograd:

* **States (LASP-2).** A linear recurrence's final state is affine in its initial state,
  ``S_end = T(S_start) + S_local``: ``T`` is the slice's total transition (an elementwise decay for diagonal
  recurrences, a K x K matrix per head for the delta rule) and ``S_local`` the final state from a zero start.
  :func:`lasp` runs the slice from zero, all-gathers ``(S_local, T)`` once per layer (size independent of L), composes
  this rank's true initial state from the ranks before it (after it, for a reverse scan) and runs the slice again
  from that state. The backward of the all-gather sums every rank's gradient of each gathered state, so the
  gradient of a rank's initial state flows back into the earlier ranks' slices: outputs and gradients equal the
  single-process run.
* **Halos.** A short causal convolution needs the previous slice's last ``W - 1`` inputs, sliding-window attention
  its last ``window`` keys/values: :func:`halo_before` (and :func:`halo_after` for bidirectional layers).
* **Packed documents.** :class:`SequenceShard` carries the global ``cu_seqlens`` and this slice's local one; a
  state or halo never crosses a document boundary, wherever the boundary falls relative to the slices.

A model runs sequence-parallel inside ``with sequence_parallel(shard):``; kernels and mixers read the shard with
:func:`active`. Every collective here is called by every rank of the group in the same order (the graphs are
the same on every rank), which is what keeps the forward and the backward free of deadlocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from zoo.packing import seq_ids, validate_cu_seqlens

__all__ = [
    "SequenceShard", "sequence_parallel", "active", "local", "slice_bounds", "all_gather", "halo_before",
    "halo_after", "carry_rows", "lasp", "count_communication", "count", "next_token_targets", "group_mean_loss", "sum_across",
]


def slice_bounds(total: int, rank: int, size: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank``'s slice of a sequence of ``total`` tokens split over ``size`` ranks."""
    if total % size:
        raise ValueError(
            f"sequence parallelism over {size} ranks needs the sequence length to be a multiple of {size}; got {total} "
            f"tokens (pad or pack the batch to a multiple of {size})."
        )
    n = total // size
    return rank * n, (rank + 1) * n


@dataclass
class SequenceShard:
    """This rank's slice of the sequences of a sequence group.

    ``group`` is the process group of the ``size`` ranks that share each sequence (None: the default group);
    ``rank`` is this process's index in it. ``cu_seqlens`` is the global packing over the ``total`` tokens of the
    one packed row (None when the batch is not packed). Derived: ``start``/``end`` of the slice, ``local_cu_seqlens``
    (the packing of the slice: documents cut at the slice edges) and ``continues_in`` (the slice's first token
    belongs to a document that began on an earlier rank, so it receives state and halos).
    """

    group: dist.ProcessGroup | None
    rank: int
    size: int
    total: int
    cu_seqlens: torch.Tensor | None = None
    start: int = field(init=False)
    end: int = field(init=False)
    local_cu_seqlens: torch.Tensor | None = field(init=False)
    continues_in: bool = field(init=False)
    continues_out: bool = field(init=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"sequence rank {self.rank} is outside a group of {self.size}.")
        self.start, self.end = slice_bounds(self.total, self.rank, self.size)
        self.local_cu_seqlens = None
        self.continues_in, self.continues_out = self.rank > 0, self.rank < self.size - 1
        if self.cu_seqlens is not None:
            cu = validate_cu_seqlens(self.cu_seqlens, self.total, op="sequence parallelism")
            inner = cu[(cu > self.start) & (cu < self.end)] - self.start
            self.local_cu_seqlens = torch.cat([inner.new_zeros(1), inner, inner.new_tensor([self.length])])
            bounds = set(cu.tolist())
            self.continues_in = self.rank > 0 and self.start not in bounds
            self.continues_out = self.rank < self.size - 1 and self.end not in bounds

    @property
    def length(self) -> int:
        """Tokens of each sequence on this rank (``total / size``)."""
        return self.end - self.start

    def positions(self, device=None) -> torch.Tensor:
        """``(length,)`` position of every local token inside its document (global positions when not packed)."""
        if self.cu_seqlens is None:
            return torch.arange(self.start, self.end, device=device)
        cu = self.cu_seqlens.long().to(device)
        doc = seq_ids(cu, self.total)[self.start : self.end]
        return torch.arange(self.start, self.end, device=device) - cu[doc]

    def global_doc_ids(self, device=None) -> torch.Tensor | None:
        """``(total,)`` document index of every token of the packed row, or None when not packed."""
        if self.cu_seqlens is None:
            return None
        return seq_ids(self.cu_seqlens.to(device), self.total)

    def take(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of a full-length tensor (e.g. input ids, labels) along ``dim``."""
        if x.shape[dim] != self.total:
            raise ValueError(f"expected {self.total} tokens along dim {dim} to slice, got {x.shape[dim]}.")
        return x.narrow(dim, self.start, self.length)


# The enclosing shard and whether a wrapper runs the plain kernel, as module globals (not ContextVars) so that
# torch.compile traces ``active()`` as a guarded constant. A training process runs one forward at a time.
_ACTIVE: SequenceShard | None = None
_LOCAL: bool = False


@contextlib.contextmanager
def sequence_parallel(shard: SequenceShard | None) -> Iterator[SequenceShard | None]:
    """Run the enclosed model forward (and kernels) sequence-parallel over ``shard`` (None: a plain run)."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, shard
    try:
        yield shard
    finally:
        _ACTIVE = previous


def active() -> SequenceShard | None:
    """The shard of the enclosing :func:`sequence_parallel` with more than one rank, else None.

    None also inside :func:`local` (a wrapper calling the plain kernel on its own slice).
    """
    shard = _ACTIVE
    if shard is None or shard.size == 1 or _LOCAL:
        return None
    return shard


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Kernels called inside run on this rank's slice only (what the sequence-parallel wrappers use)."""
    global _LOCAL
    previous, _LOCAL = _LOCAL, True
    try:
        yield
    finally:
        _LOCAL = previous


# --- collectives with autograd ----------------------------------------------------------------------------------

_COUNTS: dict[str, list[int]] | None = None  # the active count_communication (a module global: compile traces it)


@contextlib.contextmanager
def count_communication() -> Iterator[dict[str, list[int]]]:
    """Count what this rank receives from the forward collectives inside: ``{kind: [elements, bytes, calls]}``.

    Kinds: ``lasp_state`` / ``lasp_transition`` (the LASP-2 gather, P states and transitions), ``halo`` (edge tokens
    received from a neighbour), ``kv`` (attention's K/V all-gather), ``all_to_all`` (Ulysses), ``all_gather`` (any
    other). An all-gather counts the P gathered copies, an all-to-all its tensor. The backward's collectives mirror
    the forward's (an all-reduce of each gather's size, the opposite exchange) and are not counted.
    """
    global _COUNTS
    previous, _COUNTS = _COUNTS, {}
    try:
        yield _COUNTS
    finally:
        _COUNTS = previous


def count(kind: str, elements: int, element_size: int) -> None:
    """Add one collective's ``elements`` (of ``element_size`` bytes) to the active :func:`count_communication`."""
    if _COUNTS is not None:
        entry = _COUNTS.setdefault(kind, [0, 0, 0])
        entry[0] += elements
        entry[1] += elements * element_size
        entry[2] += 1


class _AllGather(torch.autograd.Function):
    """Forward: ``(P, *x.shape)`` stack of every rank's ``x``. Backward: the sum over ranks of the gradient of ours."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, rank: int, size: int) -> torch.Tensor:
        ctx.group, ctx.rank = group, rank
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(out, x, group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None, None


def all_gather(x: torch.Tensor, shard: SequenceShard, *, kind: str | None = "all_gather") -> torch.Tensor:
    """``(P, *x.shape)``: every rank's ``x`` in rank order, differentiable (complex tensors as their real view).

    ``kind`` names it for :func:`count_communication` (None: not counted, the caller counts).
    """
    if kind is not None:
        count(kind, shard.size * x.numel(), x.element_size())
    if x.is_complex():
        return torch.view_as_complex(_AllGather.apply(torch.view_as_real(x), shard.group, shard.rank, shard.size))
    return _AllGather.apply(x, shard.group, shard.rank, shard.size)


def _halo_keep(shard: SequenceShard, idx: torch.Tensor, anchor: int, device) -> torch.Tensor:
    """Bool per global token index in ``idx``: inside the sequence and in the same document as token ``anchor``."""
    inside = (idx >= 0) & (idx < shard.total)
    docs = shard.global_doc_ids(device)
    if docs is None:
        return inside
    return inside & (docs[idx.clamp(0, shard.total - 1)] == docs[anchor])


def _global_rank(shard: SequenceShard, r: int) -> int:
    return r if shard.group is None else dist.get_global_rank(shard.group, r)


class _Shift(torch.autograd.Function):
    """Each rank receives ``x`` from its neighbour ``rank - step`` (zeros where none): point-to-point, with autograd.

    ``step`` +1 passes a slice's tail to the next rank, -1 a slice's head to the previous one; the backward sends
    the gradient the other way.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, shard: SequenceShard, step: int) -> torch.Tensor:
        ctx.shard, ctx.step = shard, step
        if 0 <= shard.rank - step < shard.size:
            count("halo", x.numel(), x.element_size())
        return _exchange(x.contiguous(), shard, step)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad.contiguous(), ctx.shard, -ctx.step), None, None


def _exchange(x: torch.Tensor, shard: SequenceShard, step: int) -> torch.Tensor:
    out = torch.zeros_like(x)
    to, frm = shard.rank + step, shard.rank - step
    ops = []
    if 0 <= to < shard.size:
        ops.append(dist.P2POp(dist.isend, x, _global_rank(shard, to), shard.group))
    if 0 <= frm < shard.size:
        ops.append(dist.P2POp(dist.irecv, out, _global_rank(shard, frm), shard.group))
    for req in dist.batch_isend_irecv(ops) if ops else []:
        req.wait()
    return out


def _shift(x: torch.Tensor, shard: SequenceShard, step: int) -> torch.Tensor:
    if x.is_complex():
        return torch.view_as_complex(_Shift.apply(torch.view_as_real(x), shard, step))
    return _Shift.apply(x, shard, step)


def halo_before(x: torch.Tensor, n: int, shard: SequenceShard, dim: int = 1) -> torch.Tensor:
    """The ``n`` tokens before this slice along ``dim`` (the previous ranks' last inputs), zeros where there are none.

    Positions before the sequence start or in another document than this slice's first token are zeros, so a
    convolution that prepends the halo reaches back exactly as in the unsplit sequence. Differentiable: the halo's
    gradient goes back to its owner. ``n`` up to the slice length is one point-to-point exchange with the previous
    rank (``n`` values per channel); a longer halo spans several ranks and is all-gathered.
    """
    if n == 0:
        return x.narrow(dim, 0, 0)
    idx = torch.arange(shard.start - n, shard.start, device=x.device)  # global indices wanted
    keep = _halo_keep(shard, idx, shard.start, x.device)
    shape = [1] * x.dim()
    shape[dim] = n
    if n <= shard.length:
        out = _shift(x.narrow(dim, shard.length - n, n), shard, +1)
        return out * keep.view(shape).to(out.dtype)
    tails = all_gather(x, shard, kind="halo")  # (P, ..., length, ...): the halo reaches back over whole slices
    flat = torch.cat(list(tails.unbind(0)), dim=dim % x.dim())
    out = flat.index_select(dim, idx.clamp(0, shard.total - 1))
    return out * keep.view(shape).to(out.dtype)


def halo_after(x: torch.Tensor, n: int, shard: SequenceShard, dim: int = 1) -> torch.Tensor:
    """The ``n`` tokens after this slice along ``dim`` (the next ranks' first inputs), zeros where there are none."""
    if n == 0:
        return x.narrow(dim, 0, 0)
    idx = torch.arange(shard.end, shard.end + n, device=x.device)
    keep = _halo_keep(shard, idx, shard.end - 1, x.device)
    shape = [1] * x.dim()
    shape[dim] = n
    if n <= shard.length:
        out = _shift(x.narrow(dim, 0, n), shard, -1)
        return out * keep.view(shape).to(out.dtype)
    heads = all_gather(x, shard, kind="halo")
    flat = torch.cat(list(heads.unbind(0)), dim=dim % x.dim())
    out = flat.index_select(dim, idx.clamp(0, shard.total - 1))
    return out * keep.view(shape).to(out.dtype)


# --- states: LASP-2 ---------------------------------------------------------------------------------------------


def carry_rows(shard: SequenceShard, rows: int, *, reverse: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Which rows of a kernel's per-sequence states receive a carried state and which are carried on.

    ``rows`` is the kernel's number of states (the batch size, or with the local ``cu_seqlens`` the number of
    local documents). Unpacked: every row continues across every slice edge. Packed (one row): the first local
    document receives the state of the document it continues (if it does), the last one passes its state on;
    ``reverse`` (a scan from the end) swaps the two. Returns ``(carry_in or None, carry_out)`` as index tensors.
    """
    if shard.cu_seqlens is None:
        every = torch.arange(rows)
        receives = shard.continues_out if reverse else shard.continues_in
        return (every if receives else None), every
    first, last = torch.tensor([0]), torch.tensor([rows - 1])
    if reverse:
        return (last if shard.continues_out else None), first
    return (first if shard.continues_in else None), last


def lasp(
    run: Callable[[torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
    transition: Callable[[torch.Tensor | None], torch.Tensor],
    *,
    carry_in: torch.Tensor | None,
    carry_out: torch.Tensor,
    shard: SequenceShard,
    matrix: bool = False,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One linear recurrence over a sequence split across the group: exact outputs and final states, with autograd.

    ``run(initial_state)`` is the plain kernel on this rank's slice: initial states ``(N, *S)`` (None = zeros) ->
    ``(out, final_states (N, *S))``. ``transition(carry_in)`` is the same recurrence with the value inputs zeroed,
    started from the identity at rows ``carry_in`` (zeros elsewhere; all zeros when None) -> its final states: the
    slice's total transition per row — ``(N, *S)`` decays applied elementwise, or with ``matrix`` ``(N, ..., K, K)``
    matrices applied as ``T @ S`` (the delta rule, state ``(..., K, V)``). ``carry_in``/``carry_out`` (``(M,)`` row
    indices, the same M on every rank; see :func:`carry_rows`) say which rows receive the state composed from the
    other ranks and which rows' final states are passed on. ``reverse``: states flow from the later ranks (a scan
    from the end of the sequence). Three kernel passes on the slice; one all-gather of ``M`` states and transitions.
    """
    _, final0 = run(None)
    local_state = final0.index_select(0, carry_out.to(final0.device))  # (M, *S): from a zero start
    trans = transition(carry_in).index_select(0, carry_out.to(final0.device))  # (M, *S) or (M, ..., K, K)
    sizes = (local_state.numel(), trans.numel())
    flat = torch.cat([local_state.reshape(-1), trans.reshape(-1).to(local_state.dtype)])
    count("lasp_state", shard.size * sizes[0], flat.element_size())
    count("lasp_transition", shard.size * sizes[1], flat.element_size())
    gathered = all_gather(flat, shard, kind=None)  # (P, |S| + |T|)
    states = gathered[:, : sizes[0]].reshape(shard.size, *local_state.shape)
    trans_all = gathered[:, sizes[0] :].reshape(shard.size, *trans.shape)
    order = range(shard.size - 1, shard.rank, -1) if reverse else range(shard.rank)
    s0 = torch.zeros_like(local_state)
    for j in order:
        s0 = (trans_all[j] @ s0 if matrix else trans_all[j] * s0) + states[j]
    # Every rank must take part in the gather's backward (an all-reduce), even one that composes nothing.
    s0 = s0 + 0 * gathered.sum()
    init = torch.zeros_like(final0)
    if carry_in is not None:
        init = init.index_copy(0, carry_in.to(init.device), s0.to(init.dtype))
    else:
        init = init + 0 * s0.sum().to(init.dtype)
    return run(init)


# --- the loss over a sequence group -----------------------------------------------------------------------------


def next_token_targets(labels: torch.Tensor, shard: SequenceShard, ignore_index: int = -100) -> torch.Tensor:
    """Targets of this slice's positions, ``targets[:, t] = labels[:, t + 1]`` of the whole sequence (labels local).

    The last position of the slice predicts the next rank's first label; the last token of every document (and of
    the sequence) predicts nothing, as in the unsplit :func:`zoo.models.loss.shift_labels`.
    """
    following = halo_after(labels, 1, shard, dim=1)  # (B, 1): the next slice's first label
    targets = torch.cat([labels[:, 1:], following], dim=1).clone()
    pos = torch.arange(shard.start, shard.end, device=labels.device)
    if shard.cu_seqlens is None:
        last = pos == shard.total - 1
    else:
        ends = shard.cu_seqlens.to(labels.device).long()[1:] - 1
        last = torch.isin(pos, ends)
    targets[:, last] = ignore_index
    return targets


class _SumAcross(torch.autograd.Function):
    """All-reduce sum whose backward is the identity: each rank back-propagates its own share of a group total."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def group_mean_loss(local_mean: torch.Tensor, local_count: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """The sequence group's mean loss from this rank's mean over ``local_count`` targets (same value on every rank).

    Backward gives each rank the gradient of its own targets' share, so the sum over the group's ranks of every
    parameter's gradient is the single-process gradient (what data-parallel reduction then adds up).
    """
    count = local_count.detach().to(torch.float32).clone()
    dist.all_reduce(count, group=shard.group)
    share = torch.where(local_count > 0, local_mean.float() * local_count, local_mean.new_zeros(()).float())
    return _SumAcross.apply(share / count, shard.group)


def sum_across(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """The group's sum of ``x`` on every rank; backward: each rank's own share (see :func:`group_mean_loss`)."""
    return _SumAcross.apply(x, shard.group)
