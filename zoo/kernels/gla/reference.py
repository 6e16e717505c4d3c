"""Gated linear attention, the plain sequential recurrence: the oracle for the chunked and Triton paths.

Per head, with S a K x V matrix:  ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``,  ``o_t = scale * S_t^T q_t``.
"""

from __future__ import annotations

import torch


def gla_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One time step at a time (all rows and heads at once), in the inputs' dtype (float64 for an oracle).

    q, k ``(B, L, H, K)``, v ``(B, L, H, V)``, g ``(B, L, H)`` or ``(B, L, H, K)``;
    initial_state ``(B|N, H, K, V)``. Returns o ``(B, L, H, V)`` and the final state (or None).
    """
    B, L, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    if cu_seqlens is not None:  # each packed sequence alone, from its own initial state
        cu = [int(c) for c in cu_seqlens]
        parts = [
            gla_recurrent(
                q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], scale=scale, output_final_state=True,
                initial_state=initial_state[i : i + 1] if initial_state is not None else None,
            )
            for i, (s, e) in enumerate(zip(cu[:-1], cu[1:]))
        ]
        o = torch.cat([p[0] for p in parts], 1)
        return o, (torch.cat([p[1] for p in parts]) if output_final_state else None)
    S = initial_state.to(v.dtype) if initial_state is not None else v.new_zeros(B, H, K, V)  # (B, H, K, V)
    outs = []
    for t in range(L):
        decay = g[:, t].exp()  # (B, H) or (B, H, K)
        decay = decay[..., None, None] if decay.dim() == 2 else decay[..., None]
        S = decay * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o = torch.stack(outs, 1) if outs else v.new_zeros(B, 0, H, V)  # (B, L, H, V)
    return o, (S if output_final_state else None)
