"""GateLoop (Katsch 2023): linear recurrence with a data-controlled complex transition.

``a_t = sigmoid(|z_t|) exp(i angle(z_t))`` with ``z_t = W_a x_t`` read as complex, per head;
``S_t = a_t S_{t-1} + k_t v_t^T`` (complex state, real k and v), ``y_t = Re(S_t^T q_t)``,
output ``W_o(silu(W_g x) * y)``. The default ``head_dim=1`` ("max heads") makes the state one complex
number per channel, i.e. an elementwise complex :func:`zoo.kernels.linear_scan`. With ``head_dim = K > 1``
each head keeps a ``K x K`` complex state, scanned as ``K * K`` elementwise channels that share the head's ``a_t``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.kernels import linear_scan
from zoo.kernels.scan import pad_identity
from zoo.mixers.base import RecurrentMixer, State
from zoo.registry import register_mixer


@register_mixer("gateloop")
class GateLoop(RecurrentMixer):
    """GateLoop token mixer; ``head_dim`` 1 by default (heads = d_model)."""

    paper = ("GateLoop: Fully Data-Controlled Linear Recurrence for Sequence Modeling", "Katsch 2023", "2311.01927")
    math_section = "## GateLoop"
    state_formula = "2 · channels (one complex number per channel)"

    def __init__(self, d_model: int, *, layer_idx: int = 0, head_dim: int = 1) -> None:
        super().__init__(d_model, layer_idx=layer_idx)
        if head_dim < 1 or d_model % head_dim:
            raise ValueError(f"gateloop: head_dim={head_dim} must be >= 1 and divide d_model={d_model}.")
        self.head_dim = head_dim
        self.n_heads = d_model // head_dim
        # q, k, v, output gate (d_model each) and the transition z (re, im per head)
        self.in_proj = nn.Linear(d_model, 4 * d_model + 2 * self.n_heads, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    @property
    def _channels(self) -> int:
        return self.n_heads * self.head_dim**2

    def _coeffs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``(..., D)`` -> a, b ``(..., H K K)`` complex, q ``(..., H, K)`` and the output gate ``(..., D)``."""
        D, H, K = self.d_model, self.n_heads, self.head_dim
        u = self.in_proj(x).to(torch.promote_types(x.dtype, torch.float32))
        q, k, v, gate, z = u.split([D, D, D, D, 2 * H], dim=-1)
        z = torch.view_as_complex(rearrange(z, "... (h two) -> ... h two", two=2).contiguous())  # (..., H)
        a = torch.sigmoid(z.abs()) * torch.exp(1j * z.angle())
        q, k, v = (rearrange(t, "... (h d) -> ... h d", d=K) for t in (q, k, v))  # (..., H, K)
        kv = k[..., :, None] * v[..., None, :]  # (..., H, K, K)
        b = rearrange(kv, "... h k v -> ... (h k v)").to(a.dtype)
        a = a.repeat_interleave(K * K, dim=-1)  # (..., H K K)
        return a, b, q, gate

    def _out(self, S: torch.Tensor, q: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        S = rearrange(S.real, "... (h k v) -> ... h k v", k=self.head_dim, v=self.head_dim)
        y = rearrange(torch.einsum("...hk,...hkv->...hv", q, S), "... h v -> ... (h v)")  # (..., D)
        return self.out_proj((F.silu(gate) * y).to(dtype))

    def scan(self, x: torch.Tensor, *, state: State | None = None, mask: torch.Tensor | None = None,
             cu_seqlens: torch.Tensor | None = None, return_state: bool = False) -> tuple[torch.Tensor, State | None]:
        a, b, q, gate = self._coeffs(x)
        a, b = pad_identity(a, b, mask)
        h0 = torch.view_as_complex(state["S"].contiguous()) if state is not None else None
        S, last = linear_scan(a, b, h0, cu_seqlens=cu_seqlens, backend=self.kernel_backend("linear_scan"))  # (B, L, H K K)
        return self._out(S, q, gate, x.dtype), ({"S": torch.view_as_real(last)} if return_state else None)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        a, b, q, gate = self._coeffs(x)  # (B, H K K)
        S = a * torch.view_as_complex(state["S"].contiguous()) + b
        return self._out(S, q, gate, x.dtype), {"S": torch.view_as_real(S)}

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        dtype = torch.promote_types(dtype or torch.float32, torch.float32)
        return {"S": torch.zeros(batch_size, self._channels, 2, device=device, dtype=dtype)}

    def state_size(self, seq_len: int | None = None) -> int:
        return 2 * self._channels
