"""``chunk_delta_rule``: the (gated) delta rule of MoM / DeltaNet memories, chunked, with torch and Triton backends."""

from __future__ import annotations

import torch

from zoo.kernels._dispatch import resolve_backend
from zoo.kernels.delta_rule.chunked import chunk_delta_rule_torch
from zoo.packing import validate_cu_seqlens
from zoo.parallel import sequence

__all__ = ["chunk_delta_rule"]


def _check(q, k, v, beta, g, initial_state, cu_seqlens, chunk_size) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"chunk_delta_rule: q and k must both be (B, L, H, K); got {tuple(q.shape)} and {tuple(k.shape)}.")
    B, L, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"chunk_delta_rule: v must be (B, L, H, V) = ({B}, {L}, {H}, V); got {tuple(v.shape)}.")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"chunk_delta_rule: beta must be (B, L, H) = {(B, L, H)}; got {tuple(beta.shape)}.")
    if g is not None and g.shape != q.shape[:3]:
        raise ValueError(
            f"chunk_delta_rule: the log-decay g must be (B, L, H) = {(B, L, H)} (one scalar per head and step); "
            f"got {tuple(g.shape)}."
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_delta_rule: chunk_size must be a positive integer, got {chunk_size}.")
    N = B
    if cu_seqlens is not None:
        validate_cu_seqlens(cu_seqlens, L, op="chunk_delta_rule", batch=B)
        N = cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (N, H, K, v.shape[-1]):
        raise ValueError(
            f"chunk_delta_rule: initial_state must be (N, H, K, V) = {(N, H, K, v.shape[-1])} with N the number of "
            f"sequences; got {tuple(initial_state.shape)}."
        )


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Gated) delta rule ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = scale S_t^T q_t``.

    q, k ``(B, L, H, K)`` (L2-normalise them first), v ``(B, L, H, V)``, beta ``(B, L, H)`` in (0, 1),
    g ``(B, L, H)`` log-decay or None (plain delta rule), scale default ``K ** -0.5``.
    State ``(N, H, K, V)``: N = B, or with ``cu_seqlens`` ``(N + 1,)`` (B == 1) one state per packed
    sequence, reset at each start. Returns o ``(B, L, H, V)`` in q's dtype and the final state
    (float32, float64 for float64 inputs) if ``output_final_state`` else None.
    Backends: "torch" (chunked, autograd), "triton" (fused forward and backward kernels), None = auto.
    """
    _check(q, k, v, beta, g, initial_state, cu_seqlens, chunk_size)
    if (shard := sequence.active()) is not None:  # one sequence split across ranks
        from zoo.parallel.kernels import chunk_delta_rule_sp

        return chunk_delta_rule_sp(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                                   backend=backend, shard=shard)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = resolve_backend(backend, q, op="chunk_delta_rule")
    if backend == "cuda":
        raise RuntimeError("chunk_delta_rule: there is no 'cuda' backend; use backend='triton' or 'torch'.")
    if backend == "triton":
        from zoo.kernels.delta_rule.triton import chunk_delta_rule_triton

        return chunk_delta_rule_triton(
            q, k, v, beta, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        )
    return chunk_delta_rule_torch(
        q, k, v, beta, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size,
    )
