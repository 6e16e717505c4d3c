"""Initialisations and constructor parts shared by several mixers (one copy each)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def dt_bias_init(shape: int | tuple[int, ...], dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4) -> torch.Tensor:
    """Mamba's dt init: a bias ``b`` with ``softplus(b) = dt``, dt log-uniform in ``[dt_min, dt_max]``, floored.

    Used by Mamba (``dt_proj.bias``), Mamba-2 and Hydra (``dt_bias``) and MoM (per-memory ``dt_bias``).
    """
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"dt init needs 0 < dt_min <= dt_max; got dt_min={dt_min}, dt_max={dt_max}.")
    dt = torch.exp(torch.rand(shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse softplus


def ssd_heads(op: str, d_model: int, expand: int, headdim: int, ngroups: int) -> tuple[int, int]:
    """Inner width and head count of a Mamba-2-style (SSD) mixer, ``(expand * d_model, d_inner / headdim)``.

    ``op`` names the mixer in the errors (heads must split the inner width, groups must split the heads).
    """
    if expand < 1:
        raise ValueError(f"{op}: expand must be a positive integer (default 2); got {expand}.")
    d_inner = expand * d_model
    if headdim < 1 or d_inner % headdim:
        raise ValueError(f"{op}: headdim {headdim} must divide expand * d_model = {d_inner}; pick a divisor such as 64.")
    nheads = d_inner // headdim
    if ngroups < 1 or nheads % ngroups:
        raise ValueError(f"{op}: ngroups {ngroups} must divide the number of heads {nheads} (= expand * d_model / headdim).")
    return d_inner, nheads


#: The SSM parameters of a Mamba-2-style mixer: no weight decay, and float32 in a bf16 model.
SSD_PARAMETERS = ("dt_bias", "A_log", "D")


def build_ssd(module: nn.Module, op: str, d_model: int, *, directions: int, d_state: int, d_conv: int,
              conv_padding: int, expand: int, headdim: int, ngroups: int, chunk_size: int, dt_min: float,
              dt_max: float, dt_init_floor: float, bias: bool, conv_bias: bool,
              a_log: Callable[[int], torch.Tensor]) -> None:
    """The constructor part Mamba-2 and Hydra share: sizes, ``in_proj``, ``conv1d``, ``dt_bias``, ``A_log``, ``D``.

    ``directions`` SSD scans (Mamba-2 1, Hydra 2) each read their own B, C (``ngroups * d_state`` each) and dt
    from ``in_proj``'s ``[z, x, B, C (per direction), dt (per direction)]``; the depthwise conv runs over x and
    every B and C with ``conv_padding`` (causal ``d_conv - 1``, centred ``d_conv // 2``); dt_bias, A and D are
    per head and shared by the directions. ``a_log(nheads)`` gives A_log's initial value. The parameters are
    created in this order, so a seeded init is the same as each mixer writing them itself.
    """
    d_inner, nheads = ssd_heads(op, d_model, expand, headdim, ngroups)
    module.d_state, module.d_conv, module.headdim, module.ngroups, module.chunk_size = d_state, d_conv, headdim, ngroups, chunk_size
    module.d_inner, module.nheads = d_inner, nheads
    module.conv_dim = d_inner + 2 * directions * ngroups * d_state
    module.in_proj = nn.Linear(d_model, d_inner + module.conv_dim + directions * nheads, bias=bias)
    module.conv1d = nn.Conv1d(module.conv_dim, module.conv_dim, d_conv, groups=module.conv_dim, padding=conv_padding,
                              bias=conv_bias)
    module.dt_bias = nn.Parameter(dt_bias_init(nheads, dt_min, dt_max, dt_init_floor))
    module.A_log = nn.Parameter(a_log(nheads))  # A = -exp(A_log)
    module.D = nn.Parameter(torch.ones(nheads))
