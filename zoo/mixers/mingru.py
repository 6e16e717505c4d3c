"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?").

Both are diagonal linear recurrences ``h_t = a_t * h_{t-1} + b_t`` whose gates see only the input, so
the whole sequence runs through one :func:`zoo.kernels.linear_scan`. The gates are formed in log space
(``log sigmoid = -softplus(-k)``), which keeps minLSTM's normalised gates finite where both sigmoids
underflow. A carried-in state enters the scan as ``h0`` unchanged — exactly the value the step path
multiplies — so the parallel and sequential forms agree with a state passed in (the mismatch that
minGRU-pytorch #9 had with its ``log`` of the previous hidden state cannot happen here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels import linear_scan
from zoo.kernels.scan import pad_identity
from zoo.mixers.base import RecurrentMixer, State, as_dtype
from zoo.registry import register_mixer


def g(x: torch.Tensor) -> torch.Tensor:
    """The paper's positive activation ``x + 0.5`` for ``x >= 0`` and ``sigmoid(x)`` below, so ``h`` stays positive."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


class _MinRNN(RecurrentMixer):
    """Shared body: ``in_proj`` to the gate logits and the candidate, the scan, ``out_proj`` back to d_model.

    Subclasses define ``_gates(u)``: projected input ``(..., (n_gates + 1) E)`` -> decay ``a`` and input ``b``.
    """

    paper = ("Were RNNs All We Needed?", "Feng et al. 2024", "2410.01201")
    math_section = "## minGRU"
    state_formula = "expand · D"

    n_gates = 1

    def __init__(self, d_model: int, *, layer_idx: int = 0, expand: float = 1.0) -> None:
        super().__init__(d_model, layer_idx=layer_idx)
        self.d_inner = int(round(expand * d_model))
        if self.d_inner < 1:
            raise ValueError(f"{type(self).__name__}: expand={expand} gives no hidden units; use expand > 0.")
        self.in_proj = nn.Linear(d_model, (self.n_gates + 1) * self.d_inner, bias=False)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _coeffs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.in_proj(x).to(torch.promote_types(x.dtype, torch.float32))
        return self._gates(u)

    def scan(self, x: torch.Tensor, *, state: State | None = None, mask: torch.Tensor | None = None,
             cu_seqlens: torch.Tensor | None = None, return_state: bool = False) -> tuple[torch.Tensor, State | None]:
        a, b = pad_identity(*self._coeffs(x), mask)  # (B, L, E) each
        h, last = linear_scan(a, b, state["h"] if state is not None else None, cu_seqlens=cu_seqlens,
                              backend=self.kernel_backend("linear_scan"))
        y = self.out_proj(h.to(x.dtype))  # (B, L, D)
        return y, ({"h": last} if return_state else None)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        a, b = self._coeffs(x)  # (B, E) each
        h = a * state["h"] + b
        return self.out_proj(h.to(x.dtype)), {"h": h}

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        dtype = torch.promote_types(dtype or torch.float32, torch.float32)
        return {"h": torch.zeros(batch_size, self.d_inner, device=device, dtype=dtype)}

    def state_size(self, seq_len: int | None = None) -> int:
        return self.d_inner


@register_mixer("mingru")
class MinGRU(_MinRNN):
    """minGRU: ``z = sigmoid(W_z x)``, ``h_t = (1 - z_t) h_{t-1} + z_t g(W_h x_t)``.

    ``expand`` sets the hidden width ``E = expand * d_model`` (projections in and out around the scan);
    1.0 as in minGRU-pytorch.
    """

    n_gates = 1

    def _gates(self, u):
        k, cand = u.chunk(2, dim=-1)
        a = torch.exp(-F.softplus(k))  # 1 - z
        b = torch.exp(-F.softplus(-k)) * g(cand)  # z * g(h~)
        return a, b

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        # h = (1 - z) h + z g(h~) as one lerp (the scan's log-space gates equal these to rounding): fewer ops per token
        k, cand = as_dtype(self.in_proj(x), torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
        h = torch.lerp(state["h"], g(cand), torch.sigmoid(k))
        return self.out_proj(as_dtype(h, x.dtype)), {"h": h}


@register_mixer("minlstm")
class MinLSTM(_MinRNN):
    """minLSTM: ``f, i = sigmoid(W_f x), sigmoid(W_i x)``, ``h_t = f'_t h_{t-1} + i'_t g(W_h x_t)`` with
    ``f' = f / (f + i)`` and ``i' = i / (f + i)``. ``expand`` as in :class:`MinGRU`.
    """

    n_gates = 2

    def _gates(self, u):
        kf, ki, cand = u.chunk(3, dim=-1)
        log_f, log_i = -F.softplus(-kf), -F.softplus(-ki)
        log_norm = torch.logaddexp(log_f, log_i)
        return torch.exp(log_f - log_norm), torch.exp(log_i - log_norm) * g(cand)
