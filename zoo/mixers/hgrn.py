"""HGRN (Qin et al. 2023): a gated linear RNN whose forget gate has a learnable, layer-monotone lower bound.

``lambda_t = lb + (1 - lb) sigmoid(W_f x_t)``; the lower bound ``lb`` comes from one parameter
``Gamma (n_hgrn_layers, E)`` shared by all HGRN layers of a model: ``P = softmax(Gamma, dim=layers)``,
``lb_k = cumsum(P)[k] - P[0]`` (layer 0 is free to forget, upper layers remember longer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels import linear_scan
from zoo.kernels.scan import pad_identity
from zoo.mixers.base import RecurrentMixer, State
from zoo.registry import register_mixer

_VARIANTS = ("complex", "real")


class HGRNLowerBound(nn.Module):
    """The shared lower-bound parameter of every HGRN layer in a model; ``forward(layer_idx)`` -> ``lb (E,)``."""

    no_weight_decay = ("gamma",)  # no weight decay (zoo.train.optim.no_decay_names)

    def __init__(self, layer_indices: list[int], width: int) -> None:
        super().__init__()
        # Ones give a uniform softmax at init: lb_k = k / n_hgrn_layers.
        self.gamma = nn.Parameter(torch.ones(len(layer_indices), width))
        self.position = {idx: k for k, idx in enumerate(layer_indices)}

    def bounds(self) -> torch.Tensor:
        """All layers' lower bounds ``(n_hgrn_layers, E)``, monotone in the layer and 0 for the first."""
        p = torch.softmax(self.gamma.to(torch.promote_types(self.gamma.dtype, torch.float32)), dim=0)
        return torch.cumsum(p, dim=0) - p[0]

    def forward(self, layer_idx: int) -> torch.Tensor:
        if layer_idx not in self.position:
            raise KeyError(f"layer {layer_idx} is not an HGRN layer of this model; HGRN layers: {sorted(self.position)}.")
        return self.bounds()[self.position[layer_idx]]


@register_mixer("hgrn")
class HGRN(RecurrentMixer):
    """HGRN1 token mixer.

    ``variant="complex"`` (official): ``h_t = lambda_t e^{i theta} h_{t-1} + (1 - lambda_t) c_t`` with
    ``c_t = silu(W_re x) + i silu(W_im x)``, phase ``theta_j = 10000^(-2j/E)`` (learnable, data-independent),
    output ``W_o(LayerNorm([Re h, Im h]) * silu(W_g x))``.
    ``variant="real"`` (as in FLA): ``h_t = lambda_t h_{t-1} + (1 - lambda_t) silu(W_i x)``, output
    ``W_o(RMSNorm(h) * silu(W_g x))``.
    The lower bound comes from the model's shared :class:`HGRNLowerBound` once ``bind_shared`` is called;
    a mixer used on its own (no shared module bound) uses the bound 0.
    """

    paper = ("Hierarchically Gated Recurrent Neural Network for Sequence Modeling", "Qin, Yang & Zhong 2023", "2311.04823")
    math_section = "## HGRN"
    state_formula = "width (×2 for the complex-state variant)"

    no_weight_decay = ("theta", "norm_weight")  # no weight decay (zoo.train.optim.no_decay_names)

    def __init__(self, d_model: int, *, layer_idx: int = 0, variant: str = "complex") -> None:
        super().__init__(d_model, layer_idx=layer_idx)
        if variant not in _VARIANTS:
            raise ValueError(f"hgrn: variant must be one of {', '.join(_VARIANTS)}, got {variant!r}.")
        self.variant = variant
        E = self.width = d_model
        self.complex = variant == "complex"
        c = 2 if self.complex else 1  # real channels per state entry
        self.in_proj = nn.Linear(d_model, (2 * c + 1) * E, bias=False)  # input c_t, forget f_t, output gate
        if self.complex:
            self.theta = nn.Parameter(10000.0 ** (-2.0 * torch.arange(E, dtype=torch.float32) / E))
            self.norm = nn.LayerNorm(2 * E)
        else:  # RMSNorm(h) * silu(g), norm_before_gate=True as in FLA; weight of the RMSNorm:
            self.norm_weight = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(c * E, d_model, bias=False)

    @classmethod
    def build_shared(cls, *, d_model: int, layer_indices: list[int], n_layers: int, kwargs: list[dict]) -> nn.Module:
        return HGRNLowerBound(layer_indices, d_model)

    def lower_bound(self) -> torch.Tensor | float:
        """This layer's forget-gate lower bound ``(E,)``, or 0 when no shared module is bound."""
        shared = getattr(self, "shared", None)
        return shared(self.layer_idx) if shared is not None else 0.0

    def _coeffs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``(..., D)`` -> decay a, input b (complex for the official variant) and output gate, each ``(..., E|2E)``."""
        dt = torch.promote_types(x.dtype, torch.float32)
        u = self.in_proj(x).to(dt)
        E = self.width
        lb = self.lower_bound()
        if isinstance(lb, torch.Tensor):
            lb = lb.to(dt)
        if self.complex:
            ci, f, gate = u.split([2 * E, E, 2 * E], dim=-1)
            lam = lb + (1 - lb) * torch.sigmoid(f)
            theta = self.theta.to(dt)
            a = torch.complex(lam * torch.cos(theta), lam * torch.sin(theta))
            cr, cim = F.silu(ci).chunk(2, dim=-1)
            b = torch.complex((1 - lam) * cr, (1 - lam) * cim)
        else:
            ci, f, gate = u.split([E, E, E], dim=-1)
            a = lb + (1 - lb) * torch.sigmoid(f)
            b = (1 - a) * F.silu(ci)
        return a, b, gate

    def _out(self, h: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.complex:
            feat = torch.cat([h.real, h.imag], dim=-1)  # (..., 2E)
            w, bias = self.norm.weight.to(feat.dtype), self.norm.bias.to(feat.dtype)
            o = F.layer_norm(feat, feat.shape[-1:], w, bias, self.norm.eps) * F.silu(gate)
        else:  # in the scan dtype (float64 stays float64 for gradcheck)
            o = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * self.norm_weight.to(h.dtype) * F.silu(gate)
        return self.out_proj(o.to(dtype))

    def _pack(self, h: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(h) if self.complex else h  # complex (B, E) -> (B, E, 2)

    def _unpack(self, s: torch.Tensor) -> torch.Tensor:
        return torch.view_as_complex(s.contiguous()) if self.complex else s

    def scan(self, x: torch.Tensor, *, state: State | None = None, mask: torch.Tensor | None = None,
             cu_seqlens: torch.Tensor | None = None, return_state: bool = False) -> tuple[torch.Tensor, State | None]:
        a, b, gate = self._coeffs(x)
        a, b = pad_identity(a, b, mask)
        h0 = self._unpack(state["h"]) if state is not None else None
        h, last = linear_scan(a, b, h0, cu_seqlens=cu_seqlens, backend=self.kernel_backend("linear_scan"))  # (B, L, E)
        return self._out(h, gate, x.dtype), ({"h": self._pack(last)} if return_state else None)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        a, b, gate = self._coeffs(x)  # (B, E)
        h = a * self._unpack(state["h"]) + b
        return self._out(h, gate, x.dtype), {"h": self._pack(h)}

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        dtype = torch.promote_types(dtype or torch.float32, torch.float32)
        shape = (batch_size, self.width, 2) if self.complex else (batch_size, self.width)
        return {"h": torch.zeros(shape, device=device, dtype=dtype)}

    def state_size(self, seq_len: int | None = None) -> int:
        return self.width * (2 if self.complex else 1)
