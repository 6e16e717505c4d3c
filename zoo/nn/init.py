"""Initialisations and constructor parts shared by several mixers (one copy each)."""

from __future__ import annotations

import math

import torch


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
