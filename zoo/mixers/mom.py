"""MoM: Mixture-of-Memories (Du et al. 2025, OpenSparseLLMs/MoM).

A router sends every token to ``top_k`` of ``n_memories`` linear-attention memories (plus an always-on
shared memory). Each memory has its own key / value / beta / decay projections and short convolution and
is updated only by the tokens routed to it; the query is shared. Memory update (default ``gated_delta``):
``S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = S_t^T q_t``; ``memory: gla`` uses
gated linear attention ``S_t = alpha_t S_{t-1} + k_t v_t^T`` instead. The memories' outputs are mixed by the
renormalised routing weights (the shared one with weight 1), then gated RMSNorm and ``o_proj``.

Routing is done by sorting: every (token, memory) assignment is sorted memory-major into one packed batch of
per-(memory, sequence) sequences and run through one kernel call with ``cu_seqlens``, so work is linear in the
number of routed tokens. Capacity is unlimited: no token is ever dropped, however unbalanced the router is;
the Switch-style load-balancing loss (``aux_loss_scale``, 0.01) is what keeps the load even.

Precision: the projections run in the activations' dtype (bf16 under autocast or a bf16 model); the short
convolutions, normalisation, gates, the memory recurrence, the mixing and the gated norm run in at least float32
(autocast off), in the scan and the step alike, so bf16 decode equals the bf16 forward (2e-4 relative over 128
tokens). The router, ``A_log`` and ``dt_bias`` stay float32. Top-k routing itself is discontinuous: in a bf16
model the residual stream moves by ~1%, which re-routes ~0.5% of the tokens of a randomly initialised model and
moves its output by ~7% at L=2048 -- the fp32 model moves as much under a 1% perturbation of its input. With the
routing choices held fixed, bf16 is within 2% of fp32 (tests/test_bf16.py).
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels import causal_conv1d, chunk_delta_rule, chunk_gla
from zoo.mixers.base import RecurrentMixer, State
from zoo.nn import GatedRMSNorm, ShortConv
from zoo.nn.init import dt_bias_init
from zoo.packing import count_ids, seq_ids
from zoo.parallel import sequence
from zoo.registry import register_mixer

MEMORIES = ("gated_delta", "gla")


def _fp32_region(device: torch.device):
    """Autocast off: convolutions, the memory recurrence and the readout run in the (>= float32) dtype given."""
    return torch.autocast(device.type, enabled=False)


def _segment_conv(
    rows: torch.Tensor, seg: torch.Tensor, n_seg: int, prev: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv + SiLU over ``rows (R, E)`` grouped into segments (``seg (R,)`` sorted ids).

    Each segment continues from its own previous inputs ``prev (n_seg, E, W-1)``; returns the outputs
    ``(R, E)`` and every segment's new conv state ``(n_seg, E, W-1)``.
    """
    R, E = rows.shape
    W1 = weight.shape[-1] - 1
    counts = count_ids(seg, n_seg)
    ext_len = counts + W1  # each segment is prefixed by its W-1 carried inputs
    ext_cu = F.pad(ext_len.cumsum(0), (1, 0))
    total = R + n_seg * W1  # = ext_cu[-1], known from the shapes (no data-dependent size)
    ext_seg = torch.repeat_interleave(torch.arange(n_seg, device=rows.device), ext_len, output_size=total)
    p = torch.arange(total, device=rows.device) - ext_cu[ext_seg]  # position inside the extended segment
    row_cu = F.pad(counts.cumsum(0), (1, 0))
    src = torch.where(p < W1, R + ext_seg * W1 + p, row_cu[ext_seg] + p - W1)
    pool = torch.cat([rows, prev.to(rows.dtype).transpose(1, 2).reshape(n_seg * W1, E)])
    ext = pool[src]  # (R + n_seg * (W-1), E)
    y = causal_conv1d(ext.T[None], weight, bias, "silu", cu_seqlens=ext_cu, backend=backend)[0].T  # (R + n_seg * (W-1), E)
    last = ext_cu[1:, None] - W1 + torch.arange(W1, device=rows.device)  # (n_seg, W-1)
    own = torch.arange(R, device=rows.device) + (seg + 1) * W1  # where each row sits in ext (after its prefixes)
    return y[own], ext[last].transpose(1, 2)


@register_mixer("mom")
class MoM(RecurrentMixer):
    """Mixture-of-Memories: top-k routed gated delta-rule (or GLA) memories plus a shared memory.

    Defaults follow the paper: 4 memories, top-2, shared memory on, 4 heads; ``head_dim`` (key and value size
    per head) defaults to ``d_model // n_heads`` (256 at the paper's d_model 1024) and may be set freely.
    State per sequence: every memory's ``(H, K, V)`` matrix, its k/v conv inputs, and the q conv inputs.
    """

    paper = ("MoM: Linear Sequence Modeling with Mixture-of-Memories", "Du et al. 2025", "2502.13685")
    math_section = "## MoM"
    state_formula = (
        "n_slots · (H · K² + 2 · H · K · (conv − 1)) + H · K · (conv − 1), n_slots = n_memories (+1 shared); "
        "H heads of dim K: one K×K memory per head and slot plus the q/k/v short-conv states"
    )
    test_settings = {"n_heads": 2, "head_dim": 16, "chunk_size": 8}

    causal = True
    no_weight_decay = ("A_log", "dt_bias")  # no weight decay (zoo.train.optim.no_decay_names)
    #: Stay float32 when the model is cast to bf16/fp16 (read by ``ZooPreTrainedModel``): the decay parameters,
    #: and the router, whose top-k choice is discontinuous (a bf16-rounded router re-routes more tokens).
    keep_in_fp32 = ("A_log", "dt_bias", "router.weight")
    sequence_tiles = False  # the load-balancing loss is over the whole sequence: checkpoint whole blocks

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int = 0,
        n_memories: int = 4,
        top_k: int = 2,
        shared_memory: bool = True,
        n_heads: int = 4,
        head_dim: int | None = None,
        memory: str = "gated_delta",
        conv_size: int = 4,
        aux_loss_scale: float = 0.01,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
        backend: Literal["auto", "torch", "triton", "cuda"] | None = None,
    ) -> None:
        super().__init__(d_model, layer_idx=layer_idx)
        if not 1 <= top_k <= n_memories:
            raise ValueError(
                f"mom: top_k={top_k} must be between 1 and n_memories={n_memories}; lower top_k or add memories."
            )
        if memory not in MEMORIES:
            raise ValueError(f"mom: memory must be one of {', '.join(MEMORIES)}; got {memory!r}.")
        if head_dim is None:
            if n_heads < 1 or d_model % n_heads:
                raise ValueError(
                    f"mom: n_heads={n_heads} must divide d_model={d_model}; choose another n_heads or set head_dim."
                )
            head_dim = d_model // n_heads
        if conv_size < 1 or head_dim < 1:
            raise ValueError(f"mom: conv_size and head_dim must be >= 1; got {conv_size} and {head_dim}.")
        self.n_memories, self.top_k, self.shared_memory, self.memory = n_memories, top_k, shared_memory, memory
        self.n_heads, self.head_dim, self.conv_size = n_heads, head_dim, conv_size
        self.aux_loss_scale, self.chunk_size, self.backend = aux_loss_scale, chunk_size, backend
        self.n_slots = n_memories + int(shared_memory)  # memory slot n_memories is the shared one
        inner = n_heads * head_dim
        self.n_gates = 2 if memory == "gated_delta" else 1  # decay input a (and beta input b)
        S = self.n_slots

        self.router = nn.Linear(d_model, n_memories, bias=False)
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.q_conv = ShortConv(inner, conv_size)
        bound = 1 / math.sqrt(d_model)  # nn.Linear's default init, per memory
        self.kv_weight = nn.Parameter(torch.empty(S, 2 * inner, d_model).uniform_(-bound, bound))
        self.gate_weight = nn.Parameter(torch.empty(S, self.n_gates * n_heads, d_model).uniform_(-bound, bound))
        cbound = 1 / math.sqrt(conv_size)  # nn.Conv1d's default init for a depthwise kernel
        self.kv_conv_weight = nn.Parameter(torch.empty(S, 2 * inner, conv_size).uniform_(-cbound, cbound))
        self.kv_conv_bias = nn.Parameter(torch.zeros(S, 2 * inner))
        # Decay rate A ~ U(1, 16) stored as log, as in Gated DeltaNet / Mamba-2; no weight decay.
        self.A_log = nn.Parameter(torch.empty(S, n_heads).uniform_(1, 16).log())
        # dt_bias = softplus^-1(dt), dt log-uniform in [1e-3, 1e-1]: initial decays span slow to fast.
        self.dt_bias = nn.Parameter(dt_bias_init((S, n_heads), 1e-3, 1e-1, 1e-4))
        self.g_proj = nn.Linear(d_model, inner, bias=False)
        self.o_norm = GatedRMSNorm(inner, eps=norm_eps, norm_before_gate=True, group_size=head_dim)
        self.o_proj = nn.Linear(inner, d_model, bias=False)

    # ----- pieces shared by scan and step ------------------------------------------------------------
    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router in float32: probabilities ``(R, M)``, top-k memory ids and renormalised weights ``(R, k)``."""
        ct = torch.promote_types(x.dtype, torch.float32)
        probs = F.linear(x.to(ct), self.router.weight.to(ct)).softmax(-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        return probs, top_i, top_w / top_w.sum(-1, keepdim=True)

    def _memory_inputs(self, kv: torch.Tensor, gates: torch.Tensor, slot: torch.Tensor):
        """Conv'd kv ``(..., 2*H*K)`` and gate inputs ``(..., n_gates*H)`` -> k, v ``(..., H, K)``, beta, log-decay ``(..., H)``.

        All in at least float32 (k and v are not rounded back to the activations' dtype).
        """
        H = self.n_heads
        ct = torch.promote_types(kv.dtype, torch.float32)
        k, v = kv.to(ct).unflatten(-1, (2, H, self.head_dim)).unbind(-3)
        k = F.normalize(k, dim=-1)
        a = gates[..., :H].to(ct)
        g = -self.A_log[slot].to(ct).exp() * F.softplus(a + self.dt_bias[slot].to(ct))  # log alpha
        beta = torch.sigmoid(gates[..., H:].to(ct)) if self.memory == "gated_delta" else None
        return k, v, beta, g

    def _output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Mixed memory readout ``o (..., H, V)`` (float32) -> gated RMSNorm per head (float32) -> o_proj ``(..., D)``."""
        z = self.g_proj(x)
        with _fp32_region(x.device):
            o = self.o_norm(o.flatten(-2), z.to(o.dtype))
        return self.o_proj(o.to(x.dtype))

    def _aux(self, probs: torch.Tensor, top_i: torch.Tensor, shard=None) -> torch.Tensor:
        """Switch load-balancing loss ``scale * M * sum_m f_m P_m`` (f: routed fraction, P: mean probability).

        Under sequence parallelism (``shard``) f and P are the whole sequence group's, from one all-reduce of the
        routed counts, the token count and the probability sums; each rank back-propagates its own tokens' share.
        """
        M = self.n_memories
        if shard is None:
            frac = count_ids(top_i.reshape(-1), M).float() / top_i.numel()
            return self.aux_loss_scale * M * (frac * probs.mean(0)).sum()
        counts = count_ids(top_i.reshape(-1), M).to(probs.dtype)
        stats = sequence.sum_across(torch.cat([counts, probs.new_tensor([probs.shape[0]]), probs.sum(0)]), shard)
        counts, n, psum = stats[:M], stats[M], stats[M + 1 :]
        return self.aux_loss_scale * M * (counts / (n * self.top_k) * psum / n).sum()

    def _q_halo(self, q_in: torch.Tensor, shard, B: int, N: int) -> torch.Tensor:
        """Sequence parallelism: the q conv's inputs before this slice ``(N, E, W-1)`` (for its first document)."""
        halo = sequence.halo_before(q_in.reshape(B, -1, q_in.shape[-1]), self.conv_size - 1, shard, dim=1)
        halo = halo.transpose(1, 2)  # (B, E, W-1): every row continues (unpacked) or the first document (packed)
        return torch.cat([halo, halo.new_zeros(N - B, *halo.shape[1:])])

    def _kv_convs_sp(self, kv_convs, counts: torch.Tensor, N: int, shard, dtype: torch.dtype):
        """Sequence parallelism: every memory's k/v conv continued from the inputs routed to it on earlier ranks.

        A memory's conv state (its last W-1 routed inputs) after a slice is linear in the state before it: shifted
        up by the ``counts (N * S,)`` of inputs routed to it there (a W-1 x W-1 shift matrix), plus the slice's own
        last inputs -- LASP-2 with matrix transitions, over ``N * S`` rows (document-major).
        """
        S, W1, E = self.n_slots, self.conv_size - 1, 2 * self.n_heads * self.head_dim
        if W1 == 0:
            return kv_convs(counts.new_zeros(N, S, E, 0, dtype=dtype))
        cin, cout = sequence.carry_rows(shard, N)

        def rows(r):
            return None if r is None else (r.to(counts.device)[:, None] * S + torch.arange(S, device=counts.device)).reshape(-1)

        def run(init):  # (N * S, W-1, E) or None -> the convs' outputs and final states in that layout
            prev = counts.new_zeros(N, S, E, W1, dtype=dtype) if init is None else init.transpose(1, 2).reshape(N, S, E, W1)
            kvs, states = kv_convs(prev)
            return kvs, states.reshape(N * S, E, W1).transpose(1, 2)

        def transition(carry_in):
            i = torch.arange(W1, device=counts.device)
            shift = (i[None, None, :] == i[None, :, None] + counts[:, None, None]).to(dtype)  # (N * S, W-1, W-1)
            keep = torch.zeros(N * S, dtype=torch.bool, device=counts.device)
            if carry_in is not None:
                keep[carry_in] = True
            return shift * keep[:, None, None].to(dtype)

        kvs, states = sequence.lasp(run, transition, carry_in=rows(cin), carry_out=rows(cout), shard=shard, matrix=True)
        return kvs, states.transpose(1, 2).reshape(N, S, E, W1)

    # ----- the block interface -----------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        inner, W1 = self.n_heads * self.head_dim, self.conv_size - 1
        dtype = dtype or torch.float32
        mem_dtype = torch.promote_types(dtype, torch.float32)
        return {
            "memory": torch.zeros(batch_size, self.n_slots, self.n_heads, self.head_dim, self.head_dim, device=device,
                                  dtype=mem_dtype),
            "conv_kv": torch.zeros(batch_size, self.n_slots, 2 * inner, W1, device=device, dtype=dtype),
            "conv_q": torch.zeros(batch_size, inner, W1, device=device, dtype=dtype),
        }

    def state_size(self, seq_len: int | None = None) -> int:
        inner, W1 = self.n_heads * self.head_dim, self.conv_size - 1
        return self.n_slots * (self.n_heads * self.head_dim**2 + 2 * inner * W1) + inner * W1

    def scan(self, x, *, state=None, mask=None, cu_seqlens=None, return_state=False):
        B, L, D = x.shape
        dev = x.device
        H, K, M, S = self.n_heads, self.head_dim, self.n_memories, self.n_slots
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(
                    f"mom: cu_seqlens packs sequences into one row ending at L={L}; got B={B}: flatten the batch to "
                    "B=1 and make cu_seqlens end at L."
                )
            N = cu_seqlens.numel() - 1
            seq = seq_ids(cu_seqlens.to(dev), L)  # (L,)
        else:
            N = B
            seq = torch.arange(B, device=dev).repeat_interleave(L)  # (B*L,)
        if state is None:
            state = self.init_state(N, device=dev, dtype=x.dtype)
        elif state["memory"].shape[0] != N:
            raise ValueError(
                f"mom: the carried state holds {state['memory'].shape[0]} sequences but the input has {N}; "
                "pass the state returned for this same batch (one entry per packed sequence with cu_seqlens)."
            )
        real = torch.arange(B * L, device=dev) if mask is None else mask.reshape(-1).bool().nonzero()[:, 0]
        xr, seq_r = x.reshape(B * L, D)[real], seq[real]  # (R, D): padded tokens touch no memory
        R = xr.shape[0]

        shard = sequence.active()
        probs, top_i, top_w = self._route(xr)
        self.aux_loss = self._aux(probs, top_i, shard) if self.training and R > 0 else None
        tok = torch.arange(R, device=dev)
        slot = top_i.reshape(-1)
        tok_a, w_a = tok.repeat_interleave(self.top_k), top_w.reshape(-1)
        if self.shared_memory:
            slot, tok_a = torch.cat([slot, torch.full_like(tok, M)]), torch.cat([tok_a, tok])
            w_a = torch.cat([w_a, w_a.new_ones(R)])
        order = torch.argsort(slot * R + tok_a)  # memory-major, then sequence, then time
        slot, tok_a, w_a = slot[order], tok_a[order], w_a[order]

        # Projections in the activations' dtype (autocast applies to them); everything after them -- short
        # convolutions, normalisation, gates, the memory recurrence, the mixing -- in at least float32, as the step
        # path does, so bf16 rounds only the projections' outputs and both paths round alike.
        ct = torch.promote_types(x.dtype, torch.float32)
        q_in = self.q_proj(xr)
        per_slot = count_ids(slot, S).tolist()  # data-dependent split sizes: the one graph break under compile
        kv_rows = [(rows, F.linear(xr[rows], self.kv_weight[m]), F.linear(xr[rows], self.gate_weight[m]))
                   for m, rows in enumerate(torch.split(tok_a, per_slot))]
        # Under sequence parallelism the kernels run on this slice (sequence.local) and the states and halos that
        # reach across slice edges are exchanged here: the q conv's halo, every memory's conv and memory state.
        with _fp32_region(dev), (sequence.local() if shard is not None else contextlib.nullcontext()):
            prev_q = state["conv_q"] if shard is None else self._q_halo(q_in, shard, B, N)
            q, conv_q = _segment_conv(q_in.to(ct), seq_r, N, prev_q, self.q_conv.weight, self.q_conv.bias,
                                     self.kernel_backend("causal_conv1d"))
            q = F.normalize(q.unflatten(-1, (H, K)), dim=-1)  # (R, H, K)

            def kv_convs(prev):  # prev (N, S, 2*H*K, W-1) -> every memory's conv outputs, final states like prev
                kvs, finals = [], []
                for m, (rows, kv_in, _) in enumerate(kv_rows):
                    kv, c = _segment_conv(kv_in.to(ct), seq_r[rows], N, prev[:, m], self.kv_conv_weight[m],
                                          self.kv_conv_bias[m], self.kernel_backend("causal_conv1d"))
                    kvs.append(kv)
                    finals.append(c)
                return kvs, torch.stack(finals, 1)

            if shard is None:
                kvs, conv_kv = kv_convs(state["conv_kv"])
            else:
                kvs, conv_kv = self._kv_convs_sp(kv_convs, count_ids(seq_r[tok_a] * S + slot, N * S), N, shard, ct)
            gates = torch.cat([gt for _, _, gt in kv_rows])
            k, v, beta, g = self._memory_inputs(torch.cat(kvs), gates, slot)  # (A, H, K), (A, H)
            cu_r = F.pad(count_ids(slot * N + seq_r[tok_a], S * N).cumsum(0), (1, 0))
            kw = dict(output_final_state=return_state, cu_seqlens=cu_r, chunk_size=self.chunk_size,
                      backend=self.kernel_backend("chunk_delta_rule" if self.memory == "gated_delta" else "chunk_gla"))
            if shard is None:
                kw["initial_state"] = state["memory"].transpose(0, 1).reshape(S * N, H, K, K)  # memory-major
                delta_rule, gla = chunk_delta_rule, chunk_gla
            else:  # each memory's state composed across ranks: one stream per (memory, continued document)
                from zoo.parallel.kernels import chunk_delta_rule_sp, chunk_gla_sp

                cin, cout = sequence.carry_rows(shard, N)
                slots = torch.arange(S)[:, None] * N

                def memory_rows(r):
                    return None if r is None else (slots + r[None]).reshape(-1)

                kw.update(scale=None, initial_state=None, shard=shard, carry=(memory_rows(cin), memory_rows(cout)))
                delta_rule, gla = chunk_delta_rule_sp, chunk_gla_sp
            if self.memory == "gated_delta":
                o, hT = delta_rule(q[tok_a][None], k[None], v[None], beta[None], g[None], **kw)
            else:
                o, hT = gla(q[tok_a][None], k[None], v[None], g[None], **kw)
            o = o[0] * w_a[:, None, None].to(o.dtype)  # (A, H, V)
            y = o.new_zeros(R, H, K).index_add(0, tok_a, o)  # mix the memories' readouts per token
        out = x.new_zeros(B * L, D).index_copy(0, real, self._output(xr, y))
        new = None
        if return_state:
            sd = state["conv_q"].dtype  # conv states hold projection outputs: exact in the activations' dtype
            new = {"memory": hT.reshape(S, N, H, K, K).transpose(0, 1), "conv_kv": conv_kv.to(sd),
                   "conv_q": conv_q.to(sd)}
        return out.reshape(B, L, D), new

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        N = x.shape[0]
        H, K, M = self.n_heads, self.head_dim, self.n_memories
        _, top_i, top_w = self._route(x)
        sel, w = top_i, top_w  # (N, k)
        if self.shared_memory:
            sel = torch.cat([sel, torch.full_like(sel[:, :1], M)], 1)
            w = torch.cat([w, w.new_ones(N, 1)], 1)
        ct = torch.promote_types(x.dtype, torch.float32)
        S, E = self.n_slots, 2 * H * K
        rows = torch.arange(N, device=x.device)[:, None]
        # The same projections as the scan (one F.linear per weight, then the chosen memories), so both paths
        # round alike in bf16; the rest in at least float32.
        q_in = self.q_proj(x)
        kv_in = F.linear(x, self.kv_weight.flatten(0, 1)).unflatten(-1, (S, E))[rows, sel]  # (N, k+1, 2*H*K)
        gates = F.linear(x, self.gate_weight.flatten(0, 1)).unflatten(-1, (S, -1))[rows, sel]
        with _fp32_region(x.device):
            # q's short conv at the newest token inline (a dot over the window; no conv call per decode step)
            window_q = torch.cat([state["conv_q"].to(ct), q_in.to(ct)[..., None]], -1)  # (N, inner, W)
            q = torch.linalg.vecdot(window_q, self.q_conv.weight.to(ct))
            if self.q_conv.bias is not None:
                q = q + self.q_conv.bias.to(ct)
            if self.q_conv.activation is not None:
                q = F.silu(q)
            conv_q = window_q[..., 1:]
            q = F.normalize(q.unflatten(-1, (H, K)), dim=-1)  # (N, H, K)
            full = torch.cat([state["conv_kv"][rows, sel].to(ct), kv_in.to(ct)[..., None]], -1)  # (N, k+1, E, W)
            kv = F.silu((full * self.kv_conv_weight[sel].to(ct)).sum(-1) + self.kv_conv_bias[sel].to(ct))
            k, v, beta, g = self._memory_inputs(kv, gates, sel)
            mem = state["memory"][rows, sel].to(ct) * g.exp()[..., None, None]  # (N, k+1, H, K, V)
            if self.memory == "gated_delta":
                v = beta[..., None] * (v - torch.einsum("njhk,njhkv->njhv", k, mem))
            mem = mem + torch.einsum("njhk,njhv->njhkv", k, v)
            o = torch.einsum("nhk,njhkv->njhv", q * K**-0.5, mem)
            y = (o * w[..., None, None]).sum(1)  # (N, H, V)
        memory, conv_kv = state["memory"].clone(), state["conv_kv"].clone()
        memory[rows, sel] = mem.to(memory.dtype)
        conv_kv[rows, sel] = full[..., 1:].to(conv_kv.dtype)
        conv_q = conv_q.to(state["conv_q"].dtype)
        return self._output(x, y), {"memory": memory, "conv_kv": conv_kv, "conv_q": conv_q}
