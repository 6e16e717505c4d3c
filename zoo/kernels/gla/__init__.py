"""``chunk_gla``: gated linear attention with scalar-per-head or per-key-dim log-decay.

Per head (S is K x V): ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``.
Backends: "torch" (chunked, ``chunked.py``), "triton" (``triton.py``, forward + backward kernels);
``reference.py`` holds the sequential oracle.

Packing (``cu_seqlens``, B == 1): the packed row is scattered into a zero-padded batch of the N sequences
(right padding, which leaves each final state unchanged), run as a batch, and gathered back.
"""

from __future__ import annotations

import torch

from zoo.kernels._dispatch import resolve_backend
from zoo.kernels.gla.chunked import gla_chunked
from zoo.packing import from_padded_batch, packed_index, to_padded_batch, validate_cu_seqlens
from zoo.parallel import sequence

__all__ = ["chunk_gla"]


def _check(q, k, v, g, initial_state, cu_seqlens, chunk_size) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"chunk_gla: q and k must both be (B, L, H, K); got {tuple(q.shape)} and {tuple(k.shape)}.")
    B, L, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"chunk_gla: v must be (B, L, H, V) = ({B}, {L}, {H}, V); got {tuple(v.shape)}.")
    if tuple(g.shape) not in ((B, L, H), (B, L, H, K)):
        raise ValueError(
            f"chunk_gla: g (log-decay) must be ({B}, {L}, {H}) for a scalar decay per head or ({B}, {L}, {H}, {K}) "
            f"for a decay per key dim; got {tuple(g.shape)}."
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_gla: chunk_size must be a positive int, got {chunk_size!r}.")
    n = B
    if cu_seqlens is not None:
        validate_cu_seqlens(cu_seqlens, L, op="chunk_gla", batch=B)
        n = cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (n, H, K, v.shape[-1]):
        raise ValueError(
            f"chunk_gla: initial_state must be ({n}, {H}, {K}, {v.shape[-1]}) (one per {'sequence' if cu_seqlens is not None else 'batch row'}); "
            f"got {tuple(initial_state.shape)}."
        )


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention.

    q, k ``(B, L, H, K)``, v ``(B, L, H, V)``, g log-decay (<= 0) ``(B, L, H)`` or ``(B, L, H, K)``;
    ``scale`` defaults to ``K ** -0.5``; initial_state ``(B, H, K, V)`` (``(N, H, K, V)`` with ``cu_seqlens``).
    Returns o ``(B, L, H, V)`` in v's dtype and the final state (float32, float64 for float64 inputs;
    None unless ``output_final_state``).
    """
    _check(q, k, v, g, initial_state, cu_seqlens, chunk_size)
    if (shard := sequence.active()) is not None:  # one sequence split across ranks
        from zoo.parallel.kernels import chunk_gla_sp

        return chunk_gla_sp(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                            cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend, shard=shard)
    backend = resolve_backend(backend, q, op="chunk_gla")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    packed = cu_seqlens is not None
    if packed:
        seq, pos, lmax = packed_index(cu_seqlens)
        n = cu_seqlens.numel() - 1
        q, k, v, g = (to_padded_batch(t, seq, pos, n, lmax) for t in (q, k, v, g))
    if q.shape[1] == 0:  # nothing to scan: the state passes through
        B, _, H, K = q.shape
        o = v.new_zeros(v.shape)
        final = initial_state if initial_state is not None else q.new_zeros(B, H, K, v.shape[-1])
        final = final.to(torch.promote_types(q.dtype, torch.float32))
    elif backend == "triton":
        from zoo.kernels.gla.triton import gla_triton

        o, final = gla_triton(q, k, v, g, scale=scale, initial_state=initial_state, chunk_size=chunk_size)
    else:
        o, final = gla_chunked(q, k, v, g, scale=scale, initial_state=initial_state, chunk_size=chunk_size)
    if packed:
        o = from_padded_batch(o, seq, pos)  # (1, L, H, V)
    return o.to(v.dtype), (final if output_final_state else None)
