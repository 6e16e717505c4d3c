"""``selective_scan``: the Mamba-1 scan with mamba_ssm's argument meaning, and its one-step decode update."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.kernels._dispatch import CUDA_PACKAGES, compute_dtype, resolve_backend
from zoo.packing import validate_cu_seqlens
from zoo.parallel import sequence

__all__ = ["selective_scan", "selective_state_update"]


def _check(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, return_last_state) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must both be (B, E, L); got {tuple(u.shape)} and {tuple(delta.shape)}.")
    Bsz, E, L = u.shape
    if L == 0:
        raise ValueError("selective_scan: the sequence is empty (L = 0); pass at least one time step.")
    if A.dim() != 2 or A.shape[0] != E or A.is_complex():
        raise ValueError(f"selective_scan: A must be real (E, N) = ({E}, N); got {tuple(A.shape)} {A.dtype}.")
    N = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() not in (3, 4) or t.shape[0] != Bsz or t.shape[-2:] != (N, L):
            raise ValueError(
                f"selective_scan: {name} must be (B, N, L) or (B, G, N, L) with B={Bsz}, N={N}, L={L}; got {tuple(t.shape)}."
            )
        if t.dim() == 4 and E % t.shape[1]:
            raise ValueError(f"selective_scan: the {t.shape[1]} groups of {name} must divide the {E} channels.")
    for name, t, shape in (("D", D, (E,)), ("delta_bias", delta_bias, (E,)), ("z", z, (Bsz, E, L)),
                           ("initial_state", initial_state, (Bsz, E, N))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}; got {tuple(t.shape)}.")
    if cu_seqlens is not None:
        if initial_state is not None or return_last_state:
            raise ValueError(
                "selective_scan: initial_state / return_last_state are per batch row and cannot be combined with "
                "cu_seqlens; scan the sequences separately (batched) to carry states."
            )
        validate_cu_seqlens(cu_seqlens, L, op="selective_scan", batch=Bsz)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 selective scan, with the layouts and meaning of mamba_ssm's ``selective_scan_fn``.

    u, delta ``(B, E, L)``; A ``(E, N)`` real; B, C ``(B, N, L)`` or grouped ``(B, G, N, L)``; D, delta_bias
    ``(E,)``; z ``(B, E, L)`` gates the output with ``silu(z)``. ``dt = softplus(delta + delta_bias)`` when
    ``delta_softplus``. Returns ``out (B, E, L)`` in u's dtype and, with ``return_last_state``, the final
    state ``(B, E, N)`` in float32 (float64 for float64 inputs).

    Extras: ``initial_state (B, E, N)`` continues a previous scan (chunked prefill); ``cu_seqlens (S+1,)``
    scans packed sequences (batch 1) with the state reset at every sequence start.
    """
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, return_last_state)
    if (shard := sequence.active()) is not None:  # one sequence split across ranks
        from zoo.parallel.kernels import selective_scan_sp

        return selective_scan_sp(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend,
                                 initial_state=initial_state, cu_seqlens=cu_seqlens, shard=shard)
    backend = resolve_backend(backend, u, op="selective_scan", cuda_package=CUDA_PACKAGES["selective_scan"])
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if backend == "torch":
        from zoo.kernels.selective.chunked import selective_scan_chunked

        return selective_scan_chunked(*args, initial_state=initial_state, cu_seqlens=cu_seqlens)
    if backend == "triton":
        from zoo.kernels.selective.triton import selective_scan_triton

        return selective_scan_triton(*args, initial_state=initial_state, cu_seqlens=cu_seqlens)
    if initial_state is not None or cu_seqlens is not None:
        raise ValueError(
            "selective_scan: mamba_ssm's CUDA kernel takes no initial_state or cu_seqlens; use backend='triton'."
        )
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(*args)


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of the selective scan.

    state ``(B, E, N)``, x / dt / z ``(B, E)``, A ``(E, N)``, B / C ``(B, N)`` or ``(B, G, N)``, D / dt_bias ``(E,)``.
    Returns ``out (B, E)`` in x's dtype and the new state (state's dtype). Unlike mamba_ssm's function the
    state is not modified in place, so autograd and beam search can keep the old one.
    """
    if state.dim() != 3 or x.shape != state.shape[:2] or dt.shape != x.shape or A.shape != state.shape[1:]:
        raise ValueError(
            f"selective_state_update: expected state (B, E, N), x and dt (B, E), A (E, N); got state "
            f"{tuple(state.shape)}, x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}."
        )
    f = compute_dtype(state.dtype)
    E = x.shape[1]
    dtf = dt.to(f)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(f)
    if dt_softplus:
        dtf = F.softplus(dtf)
    Bg = B[:, None] if B.dim() == 2 else B  # (B, G, N)
    Cg = C[:, None] if C.dim() == 2 else C
    if E % Bg.shape[1]:
        raise ValueError(f"selective_state_update: {Bg.shape[1]} groups of B/C must divide the {E} channels.")
    Be = Bg.to(f).repeat_interleave(E // Bg.shape[1], dim=1)  # (B, E, N)
    Ce = Cg.to(f).repeat_interleave(E // Cg.shape[1], dim=1)
    xf = x.to(f)
    h = torch.exp(dtf[..., None] * A.to(f)) * state.to(f) + (dtf * xf)[..., None] * Be
    y = (h * Ce).sum(-1)  # (B, E)
    if D is not None:
        y = y + xf * D.to(f)
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(x.dtype), h.to(state.dtype)
