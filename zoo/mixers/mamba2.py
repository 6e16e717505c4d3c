"""Mamba-2: the SSD (state-space duality) mixer of Dao & Gu 2024, as mamba_ssm's ``Mamba2`` computes it.

``in_proj`` gives ``[z, x, B, C, dt]``; a causal depthwise conv (SiLU) runs over ``concat(x, B, C)``;
``dt = softplus(dt + dt_bias)``; per head ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T`` (state P x N),
``y_t = h_t C_t + D x_t``; then ``RMSNorm(y * silu(z))`` (grouped per ngroups) and ``out_proj``.
Parameter names follow transformers' ``Mamba2Mixer`` so checkpoints map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo import kernels
from zoo.mixers.base import RecurrentMixer, State, as_dtype
from zoo.nn.init import SSDLayer
from zoo.packing import last_inputs
from zoo.registry import register_mixer


@register_mixer("mamba2")
class Mamba2(SSDLayer, RecurrentMixer):
    """Mamba-2 / SSD mixer: ``(B, L, D) -> (B, L, D)`` with ``nheads = expand * d_model / headdim`` heads.

    Defaults are mamba_ssm's: ``d_state`` 128, ``d_conv`` 4, ``expand`` 2, ``headdim`` 64, ``ngroups`` 1 (B and C
    shared by ``nheads / ngroups`` heads), ``chunk_size`` 256 (of the SSD scan), dt log-uniform in
    ``[dt_min, dt_max]`` floored at ``dt_init_floor``, no linear bias, conv bias on.
    State: conv ``(B, conv_dim, d_conv - 1)`` and SSM ``(B, nheads, headdim, d_state)``.
    """

    paper = (
        "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space "
        "Duality (Mamba-2)", "Dao & Gu 2024", "2405.21060",
    )
    math_section = "## Mamba-2"
    state_formula = (
        "(E + 2 · ngroups · d_state) · (d_conv − 1) + nheads · headdim · d_state, E = expand · D = nheads · headdim; "
        "defaults: 262·D + 768"
    )
    test_settings = {"d_state": 16, "headdim": 8, "chunk_size": 8}

    def __init__(self, d_model: int, *, d_conv: int = 4, **options) -> None:
        """Options and parameters as :class:`zoo.nn.init.SSDLayer` makes them (its defaults are Mamba-2's)."""
        if not 2 <= d_conv <= 4:
            raise ValueError(f"mamba2: conv width d_conv={d_conv} is not supported; the causal conv kernels take 2 to 4 (default 4).")
        super().__init__(d_model, d_conv=d_conv, **options)

    def _split(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        ct = torch.promote_types(dt.dtype, torch.float32)
        return F.softplus(as_dtype(dt, ct) + as_dtype(self.dt_bias, ct))

    def scan(self, x: torch.Tensor, *, state: State | None = None, mask: torch.Tensor | None = None,
             cu_seqlens: torch.Tensor | None = None, return_state: bool = False) -> tuple[torch.Tensor, State | None]:
        """Chunked SSD path: ``x (B, L, D)`` -> ``y (B, L, D)`` and, if asked, the state after the last token."""
        Bsz, L, _ = x.shape
        if cu_seqlens is not None and state is not None:
            raise ValueError("mamba2: a carried-in state cannot be combined with cu_seqlens; prefill packed sequences from scratch.")
        z, xBC, dt = self._split(self.in_proj(x))
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)  # padded tokens enter the conv as zeros
        conv_prev = state["conv"] if state is not None else None
        xc = kernels.causal_conv1d(
            xBC.transpose(1, 2), self.conv1d.weight[:, 0], self.conv1d.bias, "silu",  # (B, conv_dim, L)
            initial_states=conv_prev.to(xBC.dtype) if conv_prev is not None else None, cu_seqlens=cu_seqlens,
            backend=self.kernel_backend("causal_conv1d"),
        ).transpose(1, 2)  # (B, L, conv_dim)
        xs, Bm, Cm = xc.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        dt = self._dt(dt)  # (B, L, H)
        if mask is not None:
            dt = dt * mask[..., None].to(dt.dtype)  # dt = 0: a padded token neither decays nor writes the state
        A = -torch.exp(self.A_log.to(dt.dtype))
        out = kernels.ssd(
            xs.reshape(Bsz, L, self.nheads, self.headdim),  # (B, L, H, P)
            dt, A,
            Bm.reshape(Bsz, L, self.ngroups, self.d_state),  # (B, L, G, N)
            Cm.reshape(Bsz, L, self.ngroups, self.d_state),
            self.D.to(dt.dtype),
            chunk_size=self.chunk_size,
            initial_state=state["ssm"] if state is not None else None,
            return_final_state=return_state,
            cu_seqlens=cu_seqlens,
            backend=self.kernel_backend("ssd"),
        )
        y, ssm = out if return_state else (out, None)
        y = self.out_proj(self.norm(y.reshape(Bsz, L, self.d_inner).to(x.dtype), z))
        if not return_state:
            return y, None
        conv = last_inputs(xBC, self.d_conv - 1, prev=conv_prev, mask=mask, cu_seqlens=cu_seqlens)
        return y, {"conv": conv, "ssm": ssm.to(dt.dtype)}

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token ``x (B, D)`` -> ``y (B, D)``: O(1) conv-state and SSM-state update.

        The arithmetic of ``causal_conv1d_update`` and the SSD recurrence in few fused ops (a decode step is
        overhead-bound): heads are viewed as ``(ngroups, heads per group)`` so B and C broadcast, never copied;
        no dtype conversion that would be a no-op.
        """
        Bsz, G, N = x.shape[0], self.ngroups, self.d_state
        conv = state["conv"]
        z, xBC, dt = self._split(self.in_proj(x))
        window = torch.cat([as_dtype(conv, xBC.dtype), xBC[..., None]], dim=-1)  # (B, conv_dim, d_conv)
        xc = torch.linalg.vecdot(window, as_dtype(self.conv1d.weight[:, 0], xBC.dtype))  # the conv at the newest position
        if self.conv1d.bias is not None:
            xc = xc + as_dtype(self.conv1d.bias, xc.dtype)
        xc = F.silu(xc)  # (B, conv_dim)
        dt = self._dt(dt)  # (B, H)
        f = dt.dtype
        xs, Bm, Cm = as_dtype(xc, f).split([self.d_inner, G * N, G * N], dim=-1)
        rep = self.nheads // G
        xs = xs.view(Bsz, G, rep, self.headdim)  # (B, G, H/G, P)
        dA = torch.exp(dt * -torch.exp(as_dtype(self.A_log, f))).view(Bsz, G, rep, 1, 1)
        dtx = (dt.view(Bsz, G, rep, 1) * xs)[..., None]  # (B, G, H/G, P, 1)
        ssm = as_dtype(state["ssm"], f).view(Bsz, G, rep, self.headdim, N)
        ssm = torch.addcmul(ssm * dA, dtx, Bm.view(Bsz, G, 1, 1, N))  # h = exp(dt A) h + dt x B^T
        y = torch.matmul(ssm, Cm.view(Bsz, G, 1, N, 1))[..., 0]  # (B, G, H/G, P)
        y = torch.addcmul(y, xs, as_dtype(self.D, f).view(G, rep, 1))  # + D x
        y = self.out_proj(self.norm(as_dtype(y.reshape(Bsz, self.d_inner), x.dtype), z))
        return y, {"conv": as_dtype(window[..., 1:], conv.dtype), "ssm": ssm.view(Bsz, self.nheads, self.headdim, N)}

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        return {
            "conv": torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            "ssm": torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                               dtype=torch.promote_types(dtype or torch.float32, torch.float32)),
        }

    def state_size(self, seq_len: int | None = None) -> int:
        return self.conv_dim * (self.d_conv - 1) + self.nheads * self.headdim * self.d_state
