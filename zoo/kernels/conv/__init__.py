"""``causal_conv1d``: depthwise causal conv with the causal-conv1d package's meaning, and its one-step update."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.kernels._compile import run_compiled, use_compiled
from zoo.kernels._dispatch import CUDA_PACKAGES, resolve_backend
from zoo.kernels._dispatch import TILE_BYTES as _TILE_BYTES
from zoo.packing import seq_index, validate_cu_seqlens
from zoo.parallel import sequence

__all__ = ["causal_conv1d", "causal_conv1d_update"]

_ACTIVATIONS = (None, "silu", "swish")
TILE_BYTES = _TILE_BYTES  # the torch path's per-tile (channels) budget for its padded input, pre-activation, grads


def _check_weight(weight: torch.Tensor, E: int, bias: torch.Tensor | None, activation: str | None, op: str) -> None:
    if weight.dim() != 2 or weight.shape[0] != E:
        raise ValueError(f"{op}: weight must be (E, W) with E={E} channels; got {tuple(weight.shape)}.")
    if weight.shape[1] < 1:
        raise ValueError(f"{op}: conv width must be at least 1; got weight {tuple(weight.shape)}.")
    if bias is not None and tuple(bias.shape) != (E,):
        raise ValueError(f"{op}: bias must be ({E},); got {tuple(bias.shape)}.")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{op}: activation must be None, 'silu' or 'swish'; got {activation!r}.")


#: Convolutions of at least this many input elements (B * E * L) run the compiled CPU path (``zoo.kernels._compile``).
COMPILE_MIN_ELEMENTS = 1 << 20


def _taps(xf, w, b):
    """``b + sum_k w_k xf[t + k]`` over the padded input ``xf (B, E, L + W - 1)``: the taps unrolled."""
    W = w.shape[1]
    L = xf.shape[-1] - W + 1
    out = b[:, None] + w[:, 0, None] * xf[..., :L]
    for k in range(1, W):
        out = out + w[:, k, None] * xf[..., k : k + L]
    return out


def _conv_fwd(xf, w, b, silu: bool):
    out = _taps(xf, w, b)
    return F.silu(out) if silu else out


def _conv_bwd(xf, w, b, gy, silu: bool):
    """Gradients of :func:`_conv_fwd` for ``gy (B, E, L)``: the padded input's (B, E, L + W - 1), the weight's and
    the bias's; the pre-activation recomputed."""
    W, L = w.shape[1], gy.shape[-1]
    g = gy
    if silu:
        pre = _taps(xf, w, b)
        s = torch.sigmoid(pre)
        g = gy * s * (1 + pre * (1 - s))
    gp = F.pad(g, (W - 1, W - 1))
    n = L + W - 1
    gxf = w[:, 0, None] * gp[..., W - 1 : W - 1 + n]  # xf[j] feeds out[j - k] through tap k
    for k in range(1, W):
        gxf = gxf + w[:, k, None] * gp[..., W - 1 - k : W - 1 - k + n]
    gw = torch.stack([(g * xf[..., k : k + L]).sum((0, 2)) for k in range(W)], 1)
    return gxf, gw, g.sum((0, 2))


class _CompiledConv(torch.autograd.Function):
    """The depthwise causal conv (+ SiLU) as two compiled CPU functions; bias and initial states optional."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_states, silu):
        W = weight.shape[1]
        xf = F.pad(x, (W - 1, 0)) if initial_states is None else torch.cat([initial_states.to(x.dtype), x], dim=-1)
        w = weight.to(x.dtype)
        b = x.new_zeros(x.shape[1]) if bias is None else bias.to(x.dtype)
        out = run_compiled("causal_conv1d", "fwd", _conv_fwd, xf, w, b, silu)
        ctx.save_for_backward(xf, w, b)
        ctx.silu, ctx.has_init = silu, initial_states is not None
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype,
                      None if initial_states is None else initial_states.dtype)
        return _conv_fwd(xf, w, b, silu) if out is None else out

    @staticmethod
    def backward(ctx, gy):
        xf, w, b = ctx.saved_tensors
        gy = gy.contiguous()
        res = run_compiled("causal_conv1d", "bwd", _conv_bwd, xf, w, b, gy, ctx.silu)
        gxf, gw, gb = _conv_bwd(xf, w, b, gy, ctx.silu) if res is None else res
        W = w.shape[1]
        w_dtype, b_dtype, s_dtype = ctx.dtypes
        return (gxf[..., W - 1 :], gw.to(w_dtype), None if b_dtype is None else gb.to(b_dtype),
                gxf[..., : W - 1].to(s_dtype) if ctx.has_init else None, None)


def _conv_torch(x, weight, bias, silu, initial_states, pos):
    """In tiles of channels under ``TILE_BYTES``: the padded input, the pre-activation and their gradients (each the
    size of x) exist for one tile at a time, and only the output and x's gradient are full size (fresh buffers past
    glibc's mmap threshold page-fault on every call, a per-token cost that grew with L)."""
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    compiled = pos is None and use_compiled("causal_conv1d", x, x.numel(), COMPILE_MIN_ELEMENTS, training)
    E = x.shape[1]
    per_channel = x.shape[0] * (x.shape[-1] + weight.shape[1]) * x.element_size()
    t = max(1, TILE_BYTES // max(per_channel, 1))
    if t >= E:
        return _conv_tile(x, weight, bias, silu, initial_states, pos, compiled)
    split = lambda v, dim: [None] * -(-E // t) if v is None else v.split(t, dim)  # noqa: E731
    parts = [_conv_tile(*a, silu, s0, pos, compiled)
             for a, s0 in zip(zip(x.split(t, 1), weight.split(t, 0), split(bias, 0)), split(initial_states, 1))]
    return torch.cat(parts, 1)


def _conv_tile(x, weight, bias, silu, initial_states, pos, compiled=False):
    if compiled:  # (per tile too: its padded copy and gradients stay under TILE_BYTES)
        return _CompiledConv.apply(x, weight, bias, initial_states, silu)
    W = weight.shape[1]
    if initial_states is None:
        xf = F.pad(x, (W - 1, 0))  # (B, E, W-1+L)
    else:
        xf = torch.cat([initial_states.to(x.dtype), x], dim=-1)
    w, b = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    if pos is None:
        out = F.conv1d(xf, w[:, None, :], b, groups=x.shape[1])
    else:
        L = x.shape[-1]
        out = x.new_zeros(x.shape) if b is None else b[:, None].expand(x.shape).clone()
        for k in range(W):  # tap k looks back W-1-k steps; it is dropped where that crosses the sequence start
            out = out + w[:, k, None] * xf[..., k : k + L] * (pos >= W - 1 - k).to(x.dtype)
    return F.silu(out) if silu else out


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    initial_states: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_final_states: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv over time, as ``causal_conv1d_fn`` of the causal-conv1d package.

    x ``(B, E, L)``, weight ``(E, W)`` with ``2 <= W <= 4``, bias ``(E,)``, activation None / "silu" / "swish".
    ``initial_states (B, E, W-1)`` are the inputs before x (chunked prefill); with ``return_final_states`` the
    last ``W-1`` inputs are returned too, as the next call's ``initial_states``. ``cu_seqlens (S+1,)`` marks
    packed sequences (batch 1): no tap reaches across a sequence start.
    """
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (B, E, L); got {tuple(x.shape)}.")
    Bsz, E, L = x.shape
    _check_weight(weight, E, bias, activation, "causal_conv1d")
    W = weight.shape[1]
    if initial_states is not None and tuple(initial_states.shape) != (Bsz, E, W - 1):
        raise ValueError(f"causal_conv1d: initial_states must be (B, E, W-1) = {(Bsz, E, W - 1)}; got {tuple(initial_states.shape)}.")
    if (shard := sequence.active()) is not None:  # one sequence split across ranks
        from zoo.parallel.kernels import causal_conv1d_sp

        return causal_conv1d_sp(x, weight, bias, activation, initial_states=initial_states, cu_seqlens=cu_seqlens,
                                return_final_states=return_final_states, backend=backend, shard=shard)
    pos = None
    if cu_seqlens is not None:
        if Bsz != 1 or initial_states is not None or return_final_states:
            raise ValueError(
                "causal_conv1d: cu_seqlens needs packed input with batch 1 and no initial_states / return_final_states; "
                "run the sequences as a batch to carry states."
            )
        validate_cu_seqlens(cu_seqlens, L, op="causal_conv1d")
        pos = seq_index(cu_seqlens, L).to(torch.int32)
    silu = activation is not None
    if backend is None and not 2 <= W <= 4:
        backend = "torch"  # the fused kernels take widths 2 to 4; any other width runs in torch
    backend = resolve_backend(backend, x, op="causal_conv1d", cuda_package=CUDA_PACKAGES["causal_conv1d"])
    if backend != "torch" and not 2 <= W <= 4:
        raise ValueError(f"causal_conv1d: the {backend!r} backend takes conv widths 2 to 4, got {W}; use backend='torch'.")
    if backend == "torch":
        out = _conv_torch(x, weight, bias, silu, initial_states, pos)
    elif backend == "triton":
        from zoo.kernels.conv.triton import causal_conv1d_triton

        out = causal_conv1d_triton(x, weight, bias, silu, initial_states, pos)
    else:
        if cu_seqlens is not None:
            raise ValueError("causal_conv1d: the 'cuda' backend takes no cu_seqlens here; use backend='triton'.")
        from causal_conv1d import causal_conv1d_fn

        out = causal_conv1d_fn(x, weight, bias, initial_states=initial_states, activation=activation)
    if not return_final_states:
        return out
    prev = initial_states.to(x.dtype) if initial_states is not None else x.new_zeros(Bsz, E, W - 1)
    return out, torch.cat([prev, x], dim=-1)[..., L:]  # last W-1 inputs


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode step(s): x ``(B, E)`` or ``(B, E, L)`` new inputs, conv_state ``(B, E, W-1)`` the previous inputs.

    Returns ``out`` shaped like x and the new state ``(B, E, W-1)``. The state is not modified in place
    (unlike causal-conv1d's function), so autograd and beam search can keep the old one.
    """
    single = x.dim() == 2
    xs = x[..., None] if single else x  # (B, E, L)
    if xs.dim() != 3:
        raise ValueError(f"causal_conv1d_update: x must be (B, E) or (B, E, L); got {tuple(x.shape)}.")
    Bsz, E, _ = xs.shape
    _check_weight(weight, E, bias, activation, "causal_conv1d_update")
    W = weight.shape[1]
    if tuple(conv_state.shape) != (Bsz, E, W - 1):
        raise ValueError(f"causal_conv1d_update: conv_state must be (B, E, W-1) = {(Bsz, E, W - 1)}; got {tuple(conv_state.shape)}.")
    out = _conv_torch(xs, weight, bias, activation is not None, conv_state, None)
    full = torch.cat([conv_state.to(xs.dtype), xs], dim=-1)
    new_state = full[..., full.shape[-1] - (W - 1) :]  # the last W-1 inputs
    return (out[..., 0] if single else out), new_state.to(conv_state.dtype)
