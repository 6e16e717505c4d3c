"""Multi-head softmax attention: GQA, RoPE, causal or bidirectional, optional sliding window (torch SDPA).

The transformer baseline and the attention half of every hybrid. Decoding keeps K/V in transformers'
``DynamicLayer`` (full) or ``DynamicSlidingWindowLayer`` (trimmed to the window).
A sliding ``window`` of W lets each query see itself and the W - 1 tokens before it.
Sequence parallelism (``sp``): ``allgather`` (default; any head count) all-gathers K/V per layer, ``ulysses``
exchanges sequence for heads with two all-to-alls (heads divisible by P); a sliding window only takes a halo of
the previous ranks' last W - 1 keys/values (see :mod:`zoo.parallel.attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from zoo.mixers.base import Mixer
from zoo.nn import RMSNorm, Rotary, apply_rotary
from zoo.packing import seq_ids, seq_index
from zoo.parallel import attention as sp_attention
from zoo.parallel import sequence
from zoo.registry import register_mixer


@register_mixer("attention")
class Attention(Mixer):
    """Softmax attention through ``F.scaled_dot_product_attention``."""

    paper = ("Attention Is All You Need", "Vaswani et al. 2017", "1706.03762")
    state_formula = "2 · n_kv_heads · head_dim · T floats for T cached tokens (T ≤ window with a sliding window); defaults: 2·D·T"
    test_settings = {"n_heads": 4}

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int = 0,
        n_heads: int = 4,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        causal: bool = True,
        window: int | None = None,
        rope: bool = True,
        rope_base: float = 10000.0,
        qk_norm: bool = False,
        bias: bool = False,
        sp: str = "allgather",
    ) -> None:
        super().__init__(d_model, layer_idx=layer_idx)
        n_kv_heads = n_kv_heads or n_heads
        if head_dim is None and d_model % n_heads:
            raise ValueError(f"attention: n_heads={n_heads} must divide d_model={d_model} (or set head_dim).")
        if n_heads % n_kv_heads:
            raise ValueError(f"attention: n_kv_heads={n_kv_heads} must divide n_heads={n_heads} for grouped-query attention.")
        if window is not None and window < 1:
            raise ValueError(f"attention: window must be a positive number of tokens or null, got {window}.")
        if window is not None and not causal:
            raise ValueError("attention: a sliding window needs causal=true (bidirectional windows are not supported).")
        sp_attention.check_mode(sp)
        self.n_heads, self.n_kv_heads, self.sp = n_heads, n_kv_heads, sp
        self.head_dim = head_dim or d_model // n_heads
        self.causal, self.has_step, self.window = causal, causal, window
        hd = self.head_dim
        self.q_proj = nn.Linear(d_model, n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(n_heads * hd, d_model, bias=bias)
        self.rotary = Rotary(hd, base=rope_base) if rope else None
        self.q_norm = RMSNorm(hd) if qk_norm else None
        self.k_norm = RMSNorm(hd) if qk_norm else None

    def cache_layer(self):
        return DynamicSlidingWindowLayer(sliding_window=self.window) if self.window else DynamicLayer()

    def state_size(self, seq_len: int | None = None) -> int:
        per_token = 2 * self.n_kv_heads * self.head_dim
        span = seq_len or 1
        if self.window is not None:
            span = min(span, self.window) if seq_len else self.window
        return per_token * span

    def _positions(self, B: int, L: int, past: int, attention_mask, cu_seqlens, device) -> torch.Tensor:
        if cu_seqlens is not None:
            return seq_index(cu_seqlens, L)[None].expand(B, L)
        if attention_mask is not None:
            pos = attention_mask.long().cumsum(-1) - 1
            return pos[:, -L:].clamp_min(0)
        return (torch.arange(L, device=device) + past)[None].expand(B, L)

    def forward(self, x, *, cache=None, attention_mask=None, cu_seqlens=None):
        if cache is not None and not self.causal:
            raise RuntimeError("attention: a bidirectional layer cannot decode with a cache; use causal=true for generation.")
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim)  # (B, L, H, K)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        shard = sequence.active()
        if self.rotary is not None:
            pos = shard.positions(x.device)[None].expand(B, L) if shard is not None else (
                self._positions(B, L, past, attention_mask, cu_seqlens, x.device))  # global positions under SP
            cos, sin = self.rotary(pos)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, K)
        if shard is not None:  # this rank's slice of a sequence split across the group (no cache, no padding)
            o = sp_attention.attention_sp(q, k, v, causal=self.causal, window=self.window, mode=self.sp, shard=shard)
            return self.o_proj(o.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, T, K): cached (window-trimmed) + new
        T = k.shape[2]
        gqa = self.n_kv_heads != self.n_heads
        qi = torch.arange(L, device=x.device) + (T - L)  # absolute query index in the key frame
        if self.window is not None and L > self.window:
            # Long prefill with a sliding window: query blocks of `window` rows see at most 2*window keys,
            # so time and memory grow linearly in L.
            W, outs = self.window, []
            for s in range(0, L, W):
                rows = qi[s : s + W]
                k0, k1 = max(0, s + T - L - W + 1), min(s + W, L) + T - L  # keys of rows[0] - W + 1 .. rows[-1]
                cols = torch.arange(k0, k1, device=x.device)
                mask = self._mask(B, rows, cols, T, attention_mask, cu_seqlens)
                outs.append(F.scaled_dot_product_attention(
                    q[:, :, s : s + W], k[:, :, k0:k1], v[:, :, k0:k1], attn_mask=mask, enable_gqa=gqa))
            o = torch.cat(outs, dim=2)
        else:
            plain = attention_mask is None and cu_seqlens is None and (self.window is None or T <= self.window)
            if plain and (T == L or not self.causal or L == 1):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and L > 1, enable_gqa=gqa)
            else:
                mask = self._mask(B, qi, torch.arange(T, device=x.device), T, attention_mask, cu_seqlens)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))

    def _mask(self, B, qi, kj, T, attention_mask, cu_seqlens) -> torch.Tensor:
        """Boolean ``(B, 1, len(qi), len(kj))`` mask (True = attend) for query rows ``qi`` and key columns ``kj``."""
        q, k = qi[:, None], kj[None, :]
        mask = k <= q if self.causal else torch.ones(len(qi), len(kj), dtype=torch.bool, device=qi.device)
        if self.window is not None:
            mask = mask & (q - k < self.window)
        mask = mask[None, None].expand(B, 1, *mask.shape)
        if cu_seqlens is not None:
            seg = seq_ids(cu_seqlens, T)  # packed input has no cache: the T keys are the packed tokens
            mask = mask & (seg[qi][:, None] == seg[kj][None, :])[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, -T:][:, kj].bool()[:, None, None, :]
            # A padded query row would see no key (NaN); let it see itself. Its output is never used.
            mask = mask | (k == q)[None, None]
        return mask
