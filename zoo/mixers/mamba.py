"""Mamba (Mamba-1; Gu & Dao 2023), computed as state-spaces/mamba's ``mamba_simple.py``.

``in_proj`` splits into (x, z); x runs through a causal depthwise conv and SiLU; ``x_proj`` makes the
input-dependent (dt, B, C); ``dt = softplus(dt_proj(dt))``; the selective scan
``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t`` is gated by ``silu(z)`` and projected
by ``out_proj``. Parameter names and shapes equal mamba_ssm's ``Mamba`` and transformers' ``MambaMixer``, so
checkpoints map one to one.

State: ``conv`` ``(B, E, d_conv - 1)``, the last ``d_conv - 1`` conv inputs (the minimal state; mamba_ssm
keeps ``d_conv`` columns, the oldest of which is never used), and ``ssm`` ``(B, E, N)`` in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels import causal_conv1d, selective_scan
from zoo.mixers.base import RecurrentMixer, State, as_dtype
from zoo.nn.init import dt_bias_init
from zoo.packing import last_inputs
from zoo.registry import register_mixer


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (SSM parameters and dt are never used in half precision)."""
    return t if t.dtype == torch.float64 else t.float()


@register_mixer("mamba")
class Mamba(RecurrentMixer):
    """The Mamba-1 selective state-space mixer.

    ``d_inner = expand * d_model``; ``dt_rank`` None means ``ceil(d_model / 16)``; dt is initialised
    log-uniform in ``[dt_min, dt_max]`` (floored at ``dt_init_floor``); ``bias`` is for in/out_proj.
    """

    paper = ("Mamba: Linear-Time Sequence Modeling with Selective State Spaces", "Gu & Dao 2023", "2312.00752")
    math_section = "## Mamba ("
    state_formula = "E · (d_conv − 1 + d_state), E = expand · D (conv state + SSM state); defaults: 2D · 19 = 38·D"
    test_settings = {"d_state": 8}

    no_weight_decay = ("A_log", "D")  # no weight decay (zoo.train.optim.no_decay_names)
    keep_in_fp32 = ("A_log", "D", "dt_proj.bias")  # SSM parameters stay float32 in a bf16 model (modeling reads it)

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int = 0,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__(d_model, layer_idx=layer_idx)
        if not 2 <= d_conv <= 4:
            raise ValueError(f"mamba: d_conv={d_conv} is not supported; use a conv width between 2 and 4.")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"mamba: dt_init must be 'random' or 'constant'; got {dt_init!r}.")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"mamba: need 0 < dt_min <= dt_max; got dt_min={dt_min}, dt_max={dt_max}.")
        if d_state < 1 or expand < 1 or (dt_rank is not None and dt_rank < 1):
            raise ValueError("mamba: d_state, expand and dt_rank must be positive integers.")
        self.d_state, self.d_conv = d_state, d_conv
        self.d_inner = E = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=conv_bias)  # weight (E, 1, d_conv)
        self.x_proj = nn.Linear(E, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, E, bias=True)
        self.out_proj = nn.Linear(E, d_model, bias=bias)

        # dt_proj.weight keeps the variance of dt at init: uniform or constant with std dt_rank^-0.5 * dt_scale.
        std = self.dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(std)
            else:
                self.dt_proj.weight.uniform_(-std, std)
            # dt_proj.bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], floored, so dt starts there.
            self.dt_proj.bias.copy_(dt_bias_init(E, dt_min, dt_max, dt_init_floor))
        # S4D-real init A = -(1..N) per channel, stored as log; kept in float32, no weight decay.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))  # skip connection

    def _ssm_params(self, xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """xc ``(..., E)`` -> dt before bias ``(..., E)``, B, C ``(..., N)``."""
        dt, B, C = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def scan(self, x: torch.Tensor, *, state: State | None = None, mask: torch.Tensor | None = None,
             cu_seqlens: torch.Tensor | None = None, return_state: bool = False) -> tuple[torch.Tensor, State | None]:
        """x ``(B, L, D)`` -> y ``(B, L, D)``; padded positions leave both states unchanged."""
        if cu_seqlens is not None and (state is not None or return_state):
            raise ValueError("mamba: packed input (cu_seqlens) cannot be combined with a cache; pass the sequences as a batch.")
        Bsz, L, _ = x.shape
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, E) each
        m = None if mask is None else mask.to(xs.dtype)[..., None]  # (B, L, 1)
        if m is not None:
            xs = xs * m  # padded inputs are zeros for the conv
        conv_in = xs.transpose(1, 2)  # (B, E, L)
        weight = self.conv1d.weight[:, 0]  # (E, d_conv)
        prev = None if state is None else state["conv"]
        xc = causal_conv1d(conv_in, weight, self.conv1d.bias, "silu", initial_states=prev, cu_seqlens=cu_seqlens,
                           backend=self.kernel_backend("causal_conv1d"))
        xc = xc.transpose(1, 2)  # (B, L, E)
        dt, Bm, Cm = self._ssm_params(xc)
        A = -torch.exp(_fp32(self.A_log))  # (E, N)
        if m is None:
            delta, delta_bias, softplus = dt, _fp32(self.dt_proj.bias), True
        else:  # dt = 0 at pads: decay exp(0) = 1 and input 0, the scan is the identity there
            delta, delta_bias, softplus = F.softplus(_fp32(dt) + _fp32(self.dt_proj.bias)) * m, None, False
            xc = xc * m
        out = selective_scan(
            xc.transpose(1, 2), delta.transpose(1, 2), A, Bm.transpose(1, 2), Cm.transpose(1, 2),
            _fp32(self.D), z.transpose(1, 2), delta_bias, softplus, return_state,
            initial_state=None if state is None else state["ssm"], cu_seqlens=cu_seqlens,
            backend=self.kernel_backend("selective_scan"),
        )
        y, ssm = out if return_state else (out, None)
        y = self.out_proj(y.transpose(1, 2).to(x.dtype))  # (B, L, D)
        if not return_state:
            return y, None
        conv = last_inputs(xs, self.d_conv - 1, prev=prev, mask=mask)  # xs: padded inputs are zeros here too
        return y, {"conv": conv.to(x.dtype), "ssm": ssm}

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token ``x (B, D)`` -> ``y (B, D)`` and the new state.

        The same arithmetic as ``causal_conv1d_update`` + ``selective_state_update``, written as few fused ops as
        possible: a decode step is overhead-bound (tiny tensors), so each op saved is time saved (no dtype
        conversion that would be a no-op).
        """
        conv, ssm = state["conv"], state["ssm"]
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, E) each
        window = torch.cat([conv, as_dtype(xs, conv.dtype)[..., None]], dim=-1)  # (B, E, d_conv)
        w = self.conv1d.weight[:, 0]
        xc = torch.linalg.vecdot(as_dtype(window, xs.dtype), as_dtype(w, xs.dtype))  # the conv at the newest token
        if self.conv1d.bias is not None:
            xc = xc + as_dtype(self.conv1d.bias, xs.dtype)
        xc = F.silu(xc)  # (B, E)
        dt, Bm, Cm = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        f = ssm.dtype if ssm.dtype == torch.float64 else torch.float32
        if dt.dtype == f:
            dt = F.softplus(F.linear(dt, self.dt_proj.weight, as_dtype(self.dt_proj.bias, f)))  # (B, E)
        else:
            dt = F.softplus(F.linear(dt, self.dt_proj.weight).to(f) + self.dt_proj.bias.to(f))
        xf = as_dtype(xc, f)
        # h = exp(dt A) h + (dt x) B, A = -exp(A_log);  y = C . h + D x, gated by silu(z)
        dA = torch.exp(dt[..., None] * -torch.exp(as_dtype(self.A_log, f)))  # (B, E, N)
        h = torch.addcmul(dA * as_dtype(ssm, f), (dt * xf)[..., None], as_dtype(Bm, f)[:, None])
        y = torch.addcmul(torch.bmm(h, as_dtype(Cm, f)[..., None])[..., 0], xf, as_dtype(self.D, f))
        y = y * F.silu(as_dtype(z, f))
        return self.out_proj(as_dtype(y, x.dtype)), {"conv": window[..., 1:], "ssm": as_dtype(h, ssm.dtype)}

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        """Zeros: conv ``(B, E, d_conv - 1)`` in ``dtype``, ssm ``(B, E, N)`` in float32."""
        E = self.d_inner
        ssm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return {
            "conv": torch.zeros(batch_size, E, self.d_conv - 1, device=device, dtype=dtype),
            "ssm": torch.zeros(batch_size, E, self.d_state, device=device, dtype=ssm_dtype),
        }

    def state_size(self, seq_len: int | None = None) -> int:
        return self.d_inner * (self.d_conv - 1 + self.d_state)
