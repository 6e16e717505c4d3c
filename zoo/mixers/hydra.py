"""Hydra: the bidirectional quasiseparable mixer of Hwang et al. 2024, built on the SSD scan.

``QS(X) = shift(SS_f(X)) + flip(shift(SS_b(flip(X)))) + X * (fc_D(X) + D)``: a forward and a backward SSD
scan with their own B, C and dt (A shared), each shifted one step so that the diagonal of the L x L mixing
matrix comes only from the data-dependent ``fc_D`` term. Around it: a non-causal depthwise conv
(SiLU), ``RMSNorm(y) * silu(z)`` and ``out_proj``. Non-causal, so there is no step (decoding) path.

Sequence parallelism: the conv takes halos of ``d_conv // 2`` inputs from both neighbours, each SSD scan runs on
the slice through :func:`zoo.parallel.sequence.lasp` (the backward scan with ``reverse=True``: its state comes
from the later ranks; the transition is ``exp(A · sum dt)`` per head), and the one-step shifts take one output
from the neighbouring slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo import kernels
from zoo.mixers.base import Mixer
from zoo.nn.init import SSDLayer
from zoo.packing import seq_ids, seq_index, seq_lengths
from zoo.parallel import sequence as sp
from zoo.registry import register_mixer


def _positions(L: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's position in its own sequence and that sequence's length, both ``(L,)``."""
    if cu_seqlens is None:
        return torch.arange(L, device=device), torch.full((L,), L, device=device)
    return seq_index(cu_seqlens, L), seq_lengths(cu_seqlens)[seq_ids(cu_seqlens, L)]


def _global_positions(shard: sp.SequenceShard, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_positions` of this rank's tokens in the whole (split) sequence: in-document position and length."""
    if shard.cu_seqlens is None:
        return torch.arange(shard.start, shard.end, device=device), torch.full((shard.length,), shard.total, device=device)
    cu = shard.cu_seqlens.long().to(device)
    return shard.positions(device), seq_lengths(cu)[shard.global_doc_ids(device)[shard.start : shard.end]]


@register_mixer("hydra")
class Hydra(SSDLayer, Mixer):
    """Hydra mixer: ``(B, L, D) -> (B, L, D)``, bidirectional; ``nheads = expand * d_model / headdim``.

    Defaults are the official module's: ``d_state`` 64, ``d_conv`` 7 (odd, centred), ``expand`` 2, ``headdim`` 64,
    ``ngroups`` 1, ``chunk_size`` 256 (of the SSD scans), dt log-uniform in ``[dt_min, dt_max]``, A_log = 0.
    Padding (left or right of the real tokens) is zeroed before the conv and is the identity in both scans.
    """

    paper = ("Hydra: Bidirectional State Space Models Through Generalized Matrix Mixers", "Hwang et al. 2024", "2407.09941")
    math_section = "## Hydra"
    state_formula = "2 · nheads · headdim · d_state (forward and backward SSD states; no decoding state)"
    test_settings = {"d_state": 16, "headdim": 8, "chunk_size": 8}

    causal = False
    has_step = False
    ssd_directions = 2  # a forward and a backward scan, each with its own B, C and dt
    norm_before_gate = True

    def __init__(self, d_model: int, *, d_state: int = 64, d_conv: int = 7, **options) -> None:
        """Options and parameters as :class:`zoo.nn.init.SSDLayer` makes them, with the official defaults above."""
        if d_conv < 1 or d_conv % 2 == 0:
            raise ValueError(f"hydra: d_conv must be odd so the non-causal conv is centred; got {d_conv}, use e.g. 7.")
        super().__init__(d_model, d_state=d_state, d_conv=d_conv, **options)

    def _a_log_init(self, nheads: int) -> torch.Tensor:
        return torch.zeros(nheads)  # A = -1 at init

    def _extra_parameters(self) -> None:
        self.fc_D = nn.Linear(self.d_inner, self.nheads, bias=False)  # the data-dependent part of the diagonal

    def _conv(self, xBC: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """Centred depthwise conv over time, ``(B, L, E) -> (B, L, E)``; never reaches across packed sequences."""
        w, b = self.conv1d.weight.to(xBC.dtype), self.conv1d.bias
        shard = sp.active()
        if cu_seqlens is None and shard is None:
            return F.conv1d(xBC.transpose(1, 2), w, b.to(xBC.dtype) if b is not None else None,
                            padding=self.d_conv // 2, groups=self.conv_dim).transpose(1, 2)
        L = xBC.shape[1]
        half = self.d_conv // 2
        y = torch.zeros_like(xBC) if b is None else b.to(xBC.dtype).expand_as(xBC).clone()
        if shard is not None:  # a slice of a split sequence: the neighbours' edge inputs instead of zeros
            pos, length = _global_positions(shard, xBC.device)
            padded = torch.cat([sp.halo_before(xBC, half, shard), xBC, sp.halo_after(xBC, half, shard)], dim=1)
        else:
            pos, length = _positions(L, cu_seqlens, xBC.device)
            padded = F.pad(xBC, (0, 0, half, half))  # (B, L + 2 half, E)
        for j in range(self.d_conv):  # tap j reads offset j - half; zero it where that leaves the sequence
            off = j - half
            ok = ((pos + off >= 0) & (pos + off < length)).to(xBC.dtype)[None, :, None]
            y = y + padded[:, j : j + L] * w[:, 0, j] * ok
        return y

    def project(
        self, u: torch.Tensor, mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The SSM inputs: z ``(B, L, E)``, x ``(B, L, H, P)``, dt_f, dt_b ``(B, L, H)``, B_f, C_f, B_b, C_b ``(B, L, G, N)``."""
        Bsz, L, _ = u.shape
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, 2 * self.nheads], dim=-1)
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)  # padded tokens enter the conv as zeros
        xBC = F.silu(self._conv(xBC, cu_seqlens))
        GN = self.ngroups * self.d_state
        x, Bf, Cf, Bb, Cb = xBC.split([self.d_inner, GN, GN, GN, GN], dim=-1)
        ct = torch.promote_types(dt.dtype, torch.float32)
        dt = F.softplus(dt.to(ct) + self.dt_bias.to(ct).repeat(2))  # (B, L, 2H)
        if mask is not None:
            dt = dt * mask[..., None].to(ct)  # dt = 0: padding is the identity in both scans
        dt_f, dt_b = dt.chunk(2, dim=-1)
        g = lambda t: t.reshape(Bsz, L, self.ngroups, self.d_state)  # noqa: E731
        return z, x.reshape(Bsz, L, self.nheads, self.headdim), dt_f, dt_b, g(Bf), g(Cf), g(Bb), g(Cb)

    def mix(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The quasiseparable mixing before the gated norm: returns ``y (B, L, E)`` and the gate ``z (B, L, E)``."""
        Bsz, L, _ = x.shape
        z, xs, dt_f, dt_b, Bf, Cf, Bb, Cb = self.project(x, mask, cu_seqlens)
        A = -torch.exp(self.A_log.to(dt_f.dtype))
        shard = sp.active()
        if shard is None:
            run = lambda *a, reverse: self._ssd(*a, cu_seqlens=cu_seqlens)  # noqa: E731
        else:
            run = lambda *a, reverse: self._ssd_sp(*a, cu_seqlens, shard, reverse)  # noqa: E731
        pos, length = _positions(L, cu_seqlens, x.device)
        t = torch.arange(L, device=x.device)
        rev = t - pos + (length - 1 - pos)  # reverses each (local) sequence in place
        y_f = run(xs, dt_f, A, Bf, Cf, reverse=False)  # (B, L, H, P)
        y_b = run(xs[:, rev], dt_b[:, rev], A, Bb[:, rev], Cb[:, rev], reverse=True)[:, rev]  # backward scan, in time order
        # shift: position t takes the forward output of t-1 and the backward output of t+1 (zero past the ends)
        if shard is not None:  # across a slice edge the neighbour's output (zero at a document edge)
            pos, length = _global_positions(shard, x.device)
            y_f = torch.cat([sp.halo_before(y_f, 1, shard), y_f[:, :-1]], dim=1)
            y_b = torch.cat([y_b[:, 1:], sp.halo_after(y_b, 1, shard)], dim=1)
        else:
            y_f, y_b = y_f.roll(1, 1), y_b.roll(-1, 1)
        y_f = y_f.masked_fill((pos == 0)[None, :, None, None], 0)
        y_b = y_b.masked_fill((pos == length - 1)[None, :, None, None], 0)
        diag = self.fc_D(xs.reshape(Bsz, L, self.d_inner)).to(dt_f.dtype) + self.D.to(dt_f.dtype)  # (B, L, H)
        y = y_f + y_b + xs * diag[..., None].to(xs.dtype)  # (B, L, H, P)
        return y.reshape(Bsz, L, self.d_inner), z

    def _ssd(self, x, dt, A, B, C, *, cu_seqlens=None, initial_state=None, final: bool = False):
        """One SSD scan of the layer (its chunk size and backend)."""
        return kernels.ssd(x, dt, A, B, C, chunk_size=self.chunk_size, initial_state=initial_state,
                           return_final_state=final, cu_seqlens=cu_seqlens, backend=self.kernel_backend("ssd"))

    def _ssd_sp(self, x, dt, A, B, C, cu_seqlens, shard: sp.SequenceShard, reverse: bool) -> torch.Tensor:
        """One SSD scan over a sequence split across ``shard``'s group (LASP-2; ``reverse``: state from later ranks).

        Inputs are this slice's, in scan order (a backward scan's already flipped per document); the state that
        enters the slice is composed from the other ranks' final states and decays ``exp(A · sum dt)`` per head.
        """
        rows = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1

        def run(init):
            with sp.local():
                return self._ssd(x, dt, A, B, C, cu_seqlens=cu_seqlens, initial_state=init, final=True)

        def transition(carry_in):
            g = dt.float() * A.float()  # (B, L, H) log-decays
            if cu_seqlens is None:
                total = g.sum(1)  # (B, H)
            else:
                docs = seq_ids(cu_seqlens.to(g.device), g.shape[1])
                total = g.new_zeros(rows, g.shape[-1]).index_add(0, docs, g[0])  # (docs, H)
            T = torch.zeros_like(total)
            if carry_in is not None:
                idx = carry_in.to(T.device)
                T = T.index_copy(0, idx, total.index_select(0, idx).exp())
            return T[:, :, None, None]  # (rows, H, 1, 1): scales the whole (P, N) state of each head

        carry_in, carry_out = sp.carry_rows(shard, rows, reverse=reverse)
        return sp.lasp(run, transition, carry_in=carry_in, carry_out=carry_out, shard=shard, reverse=reverse)[0]

    def forward(self, x, *, cache=None, attention_mask=None, cu_seqlens=None):
        """``x (B, L, D) -> (B, L, D)``; every position sees the whole (unpadded, own) sequence."""
        if cache is not None:
            raise ValueError("hydra is bidirectional and keeps no recurrent state; call it without a cache (no generation).")
        mask = attention_mask[:, -x.shape[1] :] if attention_mask is not None else None
        y, z = self.mix(x, mask, cu_seqlens)
        return self.out_proj(self.norm(y.to(x.dtype), z))

    def state_size(self, seq_len: int | None = None) -> int:
        """Floats in the two SSD states (forward and backward) that summarise a sequence; there is no decoding state."""
        return 2 * self.nheads * self.headdim * self.d_state
