"""The (gated) delta rule as a plain sequential recurrence: the oracle for the fast paths.

``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = scale * S_t^T q_t``.
"""

from __future__ import annotations

import torch


def _recurrence(q, k, v, beta, g, S):
    """One sequence: q, k ``(L, H, K)``, v ``(L, H, V)``, beta, g ``(L, H)``, S ``(H, K, V)``."""
    outs = [q.new_zeros(0, *S.shape[::2])]
    for t in range(q.shape[0]):
        S = S * g[t].exp()[:, None, None]
        kS = torch.einsum("hk,hkv->hv", k[t], S)  # (H, V): what the memory predicts for k_t
        S = S + torch.einsum("hk,hv->hkv", k[t], beta[t][:, None] * (v[t] - kS))
        outs.append(torch.einsum("hk,hkv->hv", q[t], S)[None])
    return torch.cat(outs), S


def delta_rule_reference(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequential (gated) delta rule, computed in at least float32 (float64 stays float64).

    q, k ``(B, L, H, K)``, v ``(B, L, H, V)``, beta and g ``(B, L, H)``; state ``(N, H, K, V)`` with
    N = B, or the number of sequences when ``cu_seqlens`` packs them into one row.
    Returns o ``(B, L, H, V)`` in q's dtype and the final state (float32/64) or None.
    """
    B, L, H, K = q.shape
    V = v.shape[-1]
    dt = torch.promote_types(q.dtype, torch.float32)
    scale = K**-0.5 if scale is None else scale
    if g is None:
        g = beta.new_zeros(beta.shape)
    bounds = [(b, 0, L) for b in range(B)]
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        bounds = [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
    outs, finals = [], []
    for n, (b, s, e) in enumerate(bounds):
        S = initial_state[n].to(dt) if initial_state is not None else q.new_zeros(H, K, V, dtype=dt)
        args = (x[b, s:e].to(dt) for x in (q, k, v, beta, g))
        qs, ks, vs, bs, gs = args
        on, S = _recurrence(qs * scale, ks, vs, bs, gs, S)
        outs.append(on)
        finals.append(S)
    o = torch.cat(outs)[None] if cu_seqlens is not None else torch.stack(outs)  # (B, L, H, V)
    return o.to(q.dtype), (torch.stack(finals) if output_final_state else None)
