"""Initialisations and constructor parts shared by several mixers (one copy each)."""

from __future__ import annotations

import math

import torch
from torch import nn

from zoo.nn.norm import GatedRMSNorm


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


class SSDLayer:
    """The constructor Mamba-2 and Hydra share: a mixin placed before the mixer base class.

    Its keyword-only arguments are their config options (the defaults are Mamba-2's; a mixer re-declares the ones it
    changes and passes the rest on as ``**options``, which config validation follows). It makes, in this order (so a
    seeded init does not move), ``in_proj`` (``[z, x, B and C per direction, dt per direction]``), the depthwise
    ``conv1d`` over x and every B and C (causal, or centred for a bidirectional mixer), per-head ``dt_bias``,
    ``A_log`` and ``D`` shared by the directions, the mixer's own ``_extra_parameters()``, the grouped gated
    ``norm`` and ``out_proj``. The mixer sets ``ssd_directions`` (1 or 2), ``norm_before_gate`` and, where
    it differs from Mamba-2's, ``_a_log_init(nheads)``.
    """

    ssd_directions: int = 1
    norm_before_gate: bool = False
    #: No weight decay on the SSM parameters, and float32 in a bf16 model (the model reads it).
    no_weight_decay = keep_in_fp32 = ("dt_bias", "A_log", "D")

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int = 0,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        norm_eps: float = 1e-5,
        bias: bool = False,
        conv_bias: bool = True,
    ) -> None:
        super().__init__(d_model, layer_idx=layer_idx)
        d_inner, nheads = ssd_heads(self.mixer_name, d_model, expand, headdim, ngroups)
        self.d_state, self.d_conv, self.headdim, self.ngroups, self.chunk_size = d_state, d_conv, headdim, ngroups, chunk_size
        self.d_inner, self.nheads = d_inner, nheads
        self.conv_dim = d_inner + 2 * self.ssd_directions * ngroups * d_state
        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + self.ssd_directions * nheads, bias=bias)
        padding = d_conv - 1 if self.causal else d_conv // 2
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=padding, bias=conv_bias)
        self.dt_bias = nn.Parameter(dt_bias_init(nheads, dt_min, dt_max, dt_init_floor))
        self.A_log = nn.Parameter(self._a_log_init(nheads))  # A = -exp(A_log)
        self.D = nn.Parameter(torch.ones(nheads))
        self._extra_parameters()
        self.norm = GatedRMSNorm(d_inner, eps=norm_eps, norm_before_gate=self.norm_before_gate, group_size=d_inner // ngroups)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def _a_log_init(self, nheads: int) -> torch.Tensor:
        """A_log's initial value ``(nheads,)``: Mamba-2's A ~ U(1, 16)."""
        return torch.log(torch.empty(nheads).uniform_(1, 16))

    def _extra_parameters(self) -> None:
        """Parameters of the mixer's own, made between ``D`` and ``norm`` (default: none)."""
