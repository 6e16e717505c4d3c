"""RetNet multi-scale retention (Sun et al. 2023).

Per head h a fixed decay ``gamma_h = 1 - 2^(-5-h)``; q and k get plain rotary embeddings with angles
``1 / 10000^linspace(0, 1, d_k/2)`` (no xpos), k is scaled by ``d_k^-0.5``; then per head
``S_n = gamma S_{n-1} + k_n^T v_n``, ``o_n = q_n S_n``. The output is normalised per head by an RMSNorm
without affine, gated by ``swish(W_g x)`` and projected by ``W_o``. Values are ``value_factor`` times wider
than the model.

Normalisation: none of torchscale's decay-matrix scaling (the sqrt row-sum normalisation of D and the
clamped |row sum| division) is used. Those are per-row positive factors, which the per-head RMSNorm that
follows removes anyway (up to its eps), so the three forms below compute the same, unscaled retention and
agree exactly - there are no scales to carry between them (the torchscale divergence cannot happen).

Forms: ``mode="parallel"`` is ``(Q K^T * D) V`` with ``D[n, m] = gamma^(n-m)`` (quadratic in L);
``mode="chunk"`` goes through :func:`zoo.kernels.chunk_gla` (intra-chunk parallel, state carried across
chunks); ``step`` is the recurrence, used for decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels import chunk_gla
from zoo.mixers.base import RecurrentMixer, State
from zoo.nn import rotate_half
from zoo.packing import from_padded_batch, packed_index, seq_ids, seq_index, to_padded_batch
from zoo.parallel import sequence
from zoo.registry import register_mixer

MODES = ("chunk", "parallel")


@register_mixer("retnet")
class RetNet(RecurrentMixer):
    """Multi-scale retention: ``(B, L, D) -> (B, L, D)`` with a ``(H, d_k, d_v)`` state per sequence."""

    paper = ("Retentive Network: A Successor to Transformer for Large Language Models", "Sun et al. 2023", "2307.08621")
    math_section = "## RetNet"
    state_formula = "n_heads · d_k · d_v (one d_k × d_v retention state per head)"
    test_settings = {"n_heads": 2, "chunk_size": 8}

    causal = True

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int = 0,
        n_heads: int = 4,
        value_factor: int = 2,
        mode: str = "chunk",
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__(d_model, layer_idx=layer_idx)
        if n_heads < 1 or d_model % n_heads:
            raise ValueError(f"retnet: n_heads={n_heads} must divide d_model={d_model}; pick a divisor of d_model.")
        self.head_k = d_model // n_heads
        if self.head_k % 2:
            raise ValueError(
                f"retnet: the key head dim d_model/n_heads = {self.head_k} must be even for rotary embeddings; change n_heads."
            )
        if value_factor < 1:
            raise ValueError(f"retnet: value_factor must be a positive int, got {value_factor}.")
        if mode not in MODES:
            raise ValueError(f"retnet: mode must be one of {', '.join(MODES)}; got {mode!r}.")
        self.n_heads, self.mode, self.chunk_size, self.norm_eps = n_heads, mode, chunk_size, norm_eps
        self.head_v = value_factor * d_model // n_heads
        dv = value_factor * d_model
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, dv, bias=False)
        self.g_proj = nn.Linear(d_model, dv, bias=False)
        self.o_proj = nn.Linear(dv, d_model, bias=False)
        # torchscale's init: small-gain Xavier for the input projections, plain Xavier for the output.
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj):
            nn.init.xavier_uniform_(lin.weight, gain=2**-2.5)
        nn.init.xavier_uniform_(self.o_proj.weight)

    # ----- pieces shared by every form -------------------------------------------------------------
    def log_gamma(self, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-head log-decay ``log(1 - 2^(-5-h))``, ``(H,)`` in ``dtype``."""
        return torch.log1p(-(2.0 ** (-5.0 - torch.arange(self.n_heads, dtype=dtype, device=device))))

    def _rotary(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotate ``x (B, L, H, d_k)`` at integer positions ``pos (B, L)``."""
        ct = torch.promote_types(x.dtype, torch.float32)
        angle = 1.0 / 10000 ** torch.linspace(0, 1, self.head_k // 2, device=x.device, dtype=ct)  # (d_k/2,)
        freqs = pos.to(ct)[..., None] * angle  # (B, L, d_k/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # (B, L, 1, d_k)
        xc = x.to(ct)
        return (xc * emb.cos() + rotate_half(xc) * emb.sin()).to(x.dtype)

    def _qkv(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, _ = x.shape
        q = self._rotary(self.q_proj(x).view(B, L, self.n_heads, self.head_k), pos)  # (B, L, H, d_k)
        k = self._rotary(self.k_proj(x).view(B, L, self.n_heads, self.head_k), pos) * self.head_k**-0.5
        v = self.v_proj(x).view(B, L, self.n_heads, self.head_v)  # (B, L, H, d_v)
        return q, k, v

    def _out(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm (no affine), swish gate, output projection. ``o (..., H, d_v)``, ``x (..., D)``."""
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps)  # in o's (>= float32) dtype
        o = o.to(x.dtype).flatten(-2)  # (..., H * d_v)
        return self.o_proj(F.silu(self.g_proj(x)) * o)

    # ----- the recurrent-mixer interface ----------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        """Zero retention state ``S (B, H, d_k, d_v)`` (float32 at least) and the count of tokens seen ``pos (B,)``."""
        ct = torch.promote_types(dtype or torch.float32, torch.float32)
        return {
            "S": torch.zeros(batch_size, self.n_heads, self.head_k, self.head_v, device=device, dtype=ct),
            "pos": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def state_size(self, seq_len: int | None = None) -> int:
        return self.n_heads * self.head_k * self.head_v

    def scan(self, x: torch.Tensor, *, state: State | None = None, mask: torch.Tensor | None = None,
             cu_seqlens: torch.Tensor | None = None, return_state: bool = False) -> tuple[torch.Tensor, State | None]:
        B, L, _ = x.shape
        n = B if cu_seqlens is None else cu_seqlens.numel() - 1
        offset = state["pos"] if state is not None else torch.zeros(n, dtype=torch.long, device=x.device)
        shard = sequence.active()
        if shard is not None:  # a slice of the sequence: positions count from its document's start on an earlier rank
            pos = shard.positions(x.device)[None].expand(B, L)
            counts = torch.zeros_like(offset)  # unused: the model refuses a cache under sequence parallelism
        elif cu_seqlens is not None:
            pos = (seq_index(cu_seqlens, L) + offset[seq_ids(cu_seqlens, L)])[None]  # (1, L)
            counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        elif mask is not None:
            m = mask.to(torch.long)
            pos = offset[:, None] + m.cumsum(1) - 1  # real tokens count only real tokens before them
            counts = m.sum(1)
        else:
            pos = offset[:, None] + torch.arange(L, device=x.device)
            counts = torch.full((B,), L, dtype=torch.long, device=x.device)
        q, k, v = self._qkv(x, pos.clamp(min=0))
        ct = torch.promote_types(x.dtype, torch.float32)
        g = self.log_gamma(x.device, ct).expand(B, L, -1)  # (B, L, H)
        if mask is not None:  # a pad keeps the state: decay 1, input 0
            keep = mask.to(ct)[..., None]
            g, k = g * keep, k * keep[..., None].to(k.dtype)
        S0 = state["S"] if state is not None else None
        if self.mode == "chunk":
            o, S = chunk_gla(
                q, k, v, g, scale=1.0, initial_state=S0, output_final_state=return_state,
                cu_seqlens=cu_seqlens, chunk_size=self.chunk_size, backend=self.kernel_backend("chunk_gla"),
            )
        elif shard is not None:  # the quadratic form on the slice, its state composed across ranks (LASP-2)
            from zoo.parallel.kernels import gla_lasp

            o, S = gla_lasp(lambda init: self._parallel(q, k, v, g, init, cu_seqlens), g, cu_seqlens=cu_seqlens,
                            shard=shard)
        else:
            o, S = self._parallel(q, k, v, g, S0, cu_seqlens)
        y = self._out(o, x)
        return y, ({"S": S, "pos": offset + counts} if return_state else None)

    def _parallel(self, q, k, v, g, S0, cu_seqlens):
        """``(Q K^T * D) V`` plus the carried-in state's term; packed input runs as a right-padded batch."""
        if cu_seqlens is not None:
            seq, p, lmax = packed_index(cu_seqlens)
            n = cu_seqlens.numel() - 1
            o, S = self._parallel(*(to_padded_batch(t, seq, p, n, lmax) for t in (q, k, v, g)), S0, None)
            return from_padded_batch(o, seq, p), S  # (1, L, H, d_v)
        ct = torch.promote_types(q.dtype, torch.float32)
        q, k, v, G = q.to(ct), k.to(ct), v.to(ct), g.to(ct).cumsum(1)  # G (B, L, H)
        L = q.shape[1]
        tri = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        D = (G[:, :, None] - G[:, None, :]).masked_fill(~tri[..., None], float("-inf")).exp()  # (B, L, L, H)
        o = torch.einsum("blmh,bmhv->blhv", torch.einsum("blhk,bmhk->blmh", q, k) * D, v)
        Gend = G[:, -1]  # (B, H)
        S = torch.einsum("blh,blhk,blhv->bhkv", (Gend[:, None] - G).exp(), k, v)
        if S0 is not None:
            o = o + torch.einsum("blhk,bhkv->blhv", q * G.exp()[..., None], S0.to(ct))
            S = S + Gend.exp()[..., None, None] * S0.to(ct)
        return o, S

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token ``x (B, D)``: ``S = gamma S + k^T v``, ``o = q S``."""
        pos = state["pos"]
        q, k, v = self._qkv(x[:, None], pos[:, None])
        ct = state["S"].dtype
        q, k, v = q[:, 0].to(ct), k[:, 0].to(ct), v[:, 0].to(ct)  # (B, H, d)
        gamma = self.log_gamma(x.device, ct).exp()[:, None, None]  # (H, 1, 1)
        S = gamma * state["S"] + k[..., :, None] * v[..., None, :]  # (B, H, d_k, d_v)
        o = torch.einsum("bhk,bhkv->bhv", q, S)
        return self._out(o, x), {"S": S, "pos": pos + 1}
