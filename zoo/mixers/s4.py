"""S4: a linear time-invariant state-space layer applied as a long FFT convolution (Gu et al. 2021).

Two kernels, one layer. ``mode="s4d"`` is the diagonal S4D kernel (ZOH discretisation, Vandermonde
product); ``mode="dplr"`` is the original S4 kernel: HiPPO-LegS in normal-plus-low-rank form
``A = Lambda - P P^*``, bilinear discretisation, a Cauchy kernel at the roots of unity with a Woodbury
correction for the low-rank term, then an inverse FFT. Each channel keeps ``d_state / 2`` complex modes
standing for conjugate pairs, so outputs are ``2 Re(C x)``. The layer is ``GELU(K * u + D u)`` followed by
an output linear (with GLU by default), as in the S4 repository's standalone S4D block.

The recurrent view (causal only) equals the convolution: ``x_t = A_bar x_{t-1} + B_bar u_t``,
``y_t = 2 Re(C x_t) + D u_t``. A carried-in state adds ``2 Re(C A_bar^(t+1) x0)`` to the convolution output.
Packed input (``cu_seqlens``) runs one convolution per packed sequence (a Python loop over sequences).
Padding: padded positions are zeroed, which for a convolution equals running each sequence alone as long
as padding is contiguous at the ends of a row (left padding when a state is carried in or out).

Sequence parallelism: the long convolution is an LTI recurrence, so each rank convolves its slice alone and adds
the state terms of the other slices through :func:`zoo.parallel.sequence.lasp` with the modal state ``x`` and the
transition ``A_bar^n`` for a slice of n tokens (elementwise for S4D, an N x N matrix for a causal DPLR layer); a
bidirectional (S4D) layer does the same from the end of the sequence (``reverse=True``) for its backward kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels import fft_conv
from zoo.kernels._dispatch import TILE_BYTES  # module copy: tests lower it to force many tiles
from zoo.mixers.base import RecurrentMixer, State
from zoo.parallel import sequence as sp
from zoo.registry import register_mixer

_S4D_INITS = ("lin", "inv", "real", "legs")


def hippo_legs_nplr(N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """HiPPO-LegS in diagonalised normal-plus-low-rank form, keeping the N/2 modes with positive frequency.

    Returns ``(Lambda, P, B, V)``: complex ``(N/2,)`` each and ``V (N, N/2)``, such that with the conjugate
    completion ``Vf = [V, conj(V)]`` the real LegS matrix is ``Vf (diag(Lf) - Pf Pf^*) Vf^*`` and its input
    vector is ``Vf Bf`` (``Xf = [X, conj(X)]``). Computed in float64 on the CPU (also when the layer is built on
    the meta device, as config validation does: the eigenvector selection needs values), then moved to the
    default device.
    """
    device = torch.get_default_device()
    with torch.device("cpu"):
        return tuple(t.to(device) for t in _hippo_legs_nplr_cpu(N))


def _hippo_legs_nplr_cpu(N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n = torch.arange(N, dtype=torch.float64)
    r = torch.sqrt(2 * n + 1)
    A = -torch.tril(r[:, None] * r[None, :], diagonal=-1) - torch.diag(n + 1)  # LegS: -(n+1) on the diagonal
    P = torch.sqrt(n + 0.5)
    S = A + P[:, None] * P[None, :]  # -1/2 I + a skew-symmetric matrix
    freq, V = torch.linalg.eigh(-1j * (S + 0.5 * torch.eye(N, dtype=torch.float64)))  # Hermitian: real freqs
    keep = freq > 0  # eigenvalues of a real skew matrix pair up as +-i w; keep one of each pair
    V = V[:, keep]
    lam = torch.complex(torch.full_like(freq[keep], -0.5), freq[keep])
    Vh = V.conj().T
    return lam, Vh @ P.to(V.dtype), Vh @ r.to(V.dtype), V


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _block_len(L: int) -> int:
    """Block length of the blocked Vandermonde products: ``ceil(sqrt(L))`` (at least 1)."""
    return math.isqrt(L - 1) + 1 if L > 1 else 1


def _block_powers(dtA: torch.Tensor, T: int, nb: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Powers of ``exp(dtA)`` (h, N2) for a blocked Vandermonde product over positions ``offset + b T + j``.

    Returns ``E = exp(dtA (offset + b T))`` complex ``(h, nb, N2)`` for each block start and the real-split
    in-block powers ``V = [Re; Im] exp(dtA j)`` ``(h, 2 N2, T)`` for ``j < T``. ``Re(dtA) < 0``: every factor has
    modulus at most 1. Real exp/cos/sin (several times faster than a complex exp on CPU).
    """
    rt = dtA.real.dtype
    starts = offset + T * torch.arange(nb, device=dtA.device, dtype=rt)  # (nb,)
    mag, ang = torch.exp(dtA.real[:, None, :] * starts[:, None]), dtA.imag[:, None, :] * starts[:, None]
    E = torch.complex(mag * torch.cos(ang), mag * torch.sin(ang))
    j = torch.arange(T, device=dtA.device, dtype=rt)
    mag, ang = torch.exp(dtA.real[..., None] * j), dtA.imag[..., None] * j
    return E, torch.cat([mag * torch.cos(ang), mag * torch.sin(ang)], dim=-2)


def _head_tiles(Hc: int, per_head_bytes: int) -> list[slice]:
    """Slices of the Hc channels such that a tile's intermediates stay within ``TILE_BYTES``."""
    step = max(1, TILE_BYTES // max(1, per_head_bytes))
    return [slice(h, min(Hc, h + step)) for h in range(0, Hc, step)]


def _head_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a (..., Hc, M, N) @ b (Hc, N, K) -> (..., Hc, M, K)`` as one bmm over Hc (b is not expanded over the batch)."""
    *batch, Hc, M, N = a.shape
    Bt = math.prod(batch)
    a3 = a.reshape(Bt, Hc, M, N).transpose(0, 1).reshape(Hc, Bt * M, N)
    return (a3 @ b).reshape(Hc, Bt, M, b.shape[-1]).transpose(0, 1).reshape(*batch, Hc, M, b.shape[-1])


@register_mixer("s4")
class S4(RecurrentMixer):
    """S4 / S4D layer: ``(B, L, D) -> (B, L, D)``, one SSM per channel (H = d_model).

    ``d_state`` N (even: N/2 complex modes), ``mode`` "s4d" | "dplr", ``init`` "lin" | "inv" | "real" | "legs"
    (S4D; default "lin") or "legs" (DPLR, the default there), ``dt_min``/``dt_max`` the log-uniform range of the
    step, ``bidirectional`` (a second, backward kernel per channel; then not causal and no step path),
    ``glu`` (output linear to 2D followed by a GLU, as in the S4 repository, else a D -> D linear).
    """

    paper = (
        "Efficiently Modeling Long Sequences with Structured State Spaces (S4); diagonal variant: On the "
        "Parameterization and Initialization of Diagonal State Space Models (S4D, arXiv 2206.11893)",
        "Gu, Goel & Ré 2021; Gu, Gupta, Goel & Ré 2022", "2111.00396",
    )
    math_section = "## S4"
    state_formula = "D · d_state (d_state/2 complex modes per channel, 2 floats each); doubled when bidirectional"
    test_settings = {"d_state": 16}

    no_weight_decay = ("log_dt", "log_A_real", "A_imag", "B", "P")  # no weight decay (zoo.train.optim.no_decay_names)
    #: SSM parameters stay float32 when the model is cast to bf16/fp16 (read by ``ZooPreTrainedModel``):
    #: rounded to bf16, dt, A, B and C move the kernel by tens of percent.
    keep_in_fp32 = ("log_dt", "log_A_real", "A_imag", "B", "C", "P")

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int = 0,
        d_state: int = 64,
        mode: str = "s4d",
        init: str | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        bidirectional: bool = False,
        glu: bool = True,
    ) -> None:
        super().__init__(d_model, layer_idx=layer_idx)
        if mode not in ("s4d", "dplr"):
            raise ValueError(f"s4: mode must be 's4d' (diagonal) or 'dplr' (HiPPO-LegS normal plus low rank); got {mode!r}.")
        init = init or ("lin" if mode == "s4d" else "legs")
        if mode == "s4d" and init not in _S4D_INITS:
            raise ValueError(f"s4: init for mode 's4d' must be one of {', '.join(_S4D_INITS)}; got {init!r}.")
        if mode == "dplr" and init != "legs":
            raise ValueError(f"s4: mode 'dplr' is initialised from HiPPO-LegS only; set init: legs (or leave it unset), not {init!r}.")
        if d_state < 2 or d_state % 2:
            raise ValueError(
                f"s4: d_state must be a positive even number (N/2 complex-conjugate mode pairs); got {d_state}, use e.g. 64."
            )
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"s4: need 0 < dt_min <= dt_max; got dt_min={dt_min}, dt_max={dt_max}.")
        self.mode, self.init, self.d_state, self.bidirectional = mode, init, d_state, bidirectional
        self.causal = not bidirectional
        self.has_step = not bidirectional
        H, N2 = d_model, d_state // 2
        Hc = 2 * H if bidirectional else H  # a bidirectional layer has a forward and a backward SSM per channel

        log_dt = torch.rand(Hc) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)  # log dt ~ U[log dt_min, log dt_max]
        n = torch.arange(N2, dtype=torch.float64)
        B = torch.ones(Hc, N2, dtype=torch.complex128)
        P = None
        if init == "lin":  # S4D-Lin: A = -1/2 + i pi n
            lam = torch.complex(torch.full_like(n, -0.5), math.pi * n)
        elif init == "inv":  # S4D-Inv: A = -1/2 + i N/pi (N/(2n+1) - 1)
            lam = torch.complex(torch.full_like(n, -0.5), d_state / math.pi * (d_state / (2 * n + 1) - 1))
        elif init == "real":  # S4D-Real: A = -(n+1)
            lam = torch.complex(-(n + 1), torch.zeros_like(n))
        else:  # LegS: the diagonal part of HiPPO-LegS's NPLR form (S4D-LegS), plus its low-rank term for DPLR
            lam, p, b, _ = hippo_legs_nplr(d_state)
            B = b.expand(Hc, N2).clone()
            P = p.expand(Hc, N2).clone()
        lam = lam.expand(Hc, N2)
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.log(-lam.real).float())  # Re A = -exp(log_A_real) < 0 keeps it stable
        self.A_imag = nn.Parameter(lam.imag.float().clone())
        self.B = nn.Parameter(torch.view_as_real(B.to(torch.complex64)).clone())  # (Hc, N2, 2)
        self.C = nn.Parameter(torch.view_as_real(torch.randn(Hc, N2, dtype=torch.complex64)))  # (Hc, N2, 2)
        self.P = nn.Parameter(torch.view_as_real(P.to(torch.complex64)).clone()) if mode == "dplr" else None
        self.D = nn.Parameter(torch.randn(H))
        self.out_proj = nn.Linear(H, 2 * H if glu else H)
        self.glu = glu

    # ----- the continuous and discrete system -------------------------------------------------
    def _params(self) -> tuple[torch.Tensor, ...]:
        """dt ``(Hc,)``, A, B, C (and P for DPLR) as complex ``(Hc, N/2)`` in at least float32."""
        rt = torch.promote_types(self.log_dt.dtype, torch.float32)
        dt = self.log_dt.to(rt).exp()
        A = torch.complex(-self.log_A_real.to(rt).exp(), self.A_imag.to(rt))
        cx = lambda p: torch.view_as_complex(p.to(rt).contiguous())  # noqa: E731
        return dt, A, cx(self.B), cx(self.C), (cx(self.P) if self.P is not None else None)

    def _dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """DPLR in the conjugate-completed basis: ``A (Hc, N, N)``, ``A_bar``, ``B (Hc, N)``, ``B_bar`` (bilinear)."""
        dt, lam, B, _, P = self._params()
        Lf, Pf, Bf = (torch.cat([v, v.conj()], dim=-1) for v in (lam, P, B))  # (Hc, N)
        A = torch.diag_embed(Lf) - Pf[:, :, None] * Pf[:, None, :].conj()  # (Hc, N, N)
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        half = dt[:, None, None] / 2 * A
        dA = torch.linalg.solve(eye - half, eye + half)
        dB = torch.linalg.solve(eye - half, (dt[:, None] * Bf)[..., None])[..., 0]
        return A, dA, Bf, dB

    def _cauchy_tiles(self, Ct: torch.Tensor, w: torch.Tensor, L: int, *, real: bool):
        """The generating function ``Ct M(z)^-1 w`` at the L-th roots of unity, in tiles of nodes.

        Ct ``(..., Hc, M, N)``, w ``(..., Hc, N)``; yields ``(nodes slice, (..., Hc, M, tile))``. At a node z,
        ``M(z) = (1-z) I - dt/2 (1+z) A`` is a diagonal plus rank one whose inverse the Woodbury identity gives
        from four Cauchy sums. Tiles of nodes keep the ``(Hc, N, nodes)`` Cauchy matrix within ``TILE_BYTES``.
        ``real=True`` evaluates only the L/2+1 nodes an irfft needs.
        """
        dt, lam, _, _, P = self._params()
        Lf, Pf = (torch.cat([v, v.conj()], dim=-1) for v in (lam, P))  # (Hc, N)
        Hc, N = Lf.shape
        M = Ct.shape[-2]
        Bt = max(Ct[..., 0, 0].numel(), w[..., 0].numel()) // Hc  # batch rows
        n_nodes = L // 2 + 1 if real else L
        per_node = Lf.element_size() * Hc * max(N, Bt * M)
        step = max(1, TILE_BYTES // per_node)
        cw, cp = Ct * w[..., None, :], Ct * Pf[:, None, :]  # (..., Hc, M, N)
        pw, pp = (Pf.conj() * w)[..., None, :], (Pf.conj() * Pf)[:, None, :]  # (..., Hc, 1, N), (Hc, 1, N)
        for k0 in range(0, n_nodes, step):
            nodes = torch.arange(k0, min(n_nodes, k0 + step), device=dt.device, dtype=dt.dtype)
            z = torch.exp(-2j * math.pi * nodes / L).to(Lf.dtype)  # roots of unity
            s = dt[:, None] / 2 * (1 + z)  # (Hc, tile)
            inv = 1 / ((1 - z) - s[:, None, :] * Lf[:, :, None])  # (Hc, N, tile); Re(lam) < 0 keeps it finite
            k_cw, k_cp, k_pw = _head_mm(cw, inv), _head_mm(cp, inv), _head_mm(pw, inv)
            k_pp = pp @ inv  # (Hc, 1, tile)
            s = s[:, None, :]
            yield slice(k0, k0 + nodes.numel()), k_cw - s * k_cp * k_pw / (1 + s * k_pp)

    def _cauchy(self, Ct: torch.Tensor, w: torch.Tensor, L: int, *, real: bool) -> torch.Tensor:
        """``C A_bar^l v`` for l < L (DPLR, bilinear) from ``Ct = C (I - A_bar^L)`` and ``w = (I - dt/2 A) v``.

        Ct ``(..., Hc, M, N)``, w ``(..., Hc, N)`` -> ``(..., Hc, M, L)``: the generating function at the roots
        of unity (:meth:`_cauchy_tiles`), then an inverse FFT. ``real=True`` (conjugate-symmetric Ct and w, so a
        real sequence) evaluates only L/2+1 nodes and uses irfft.
        """
        T = torch.cat([t for _, t in self._cauchy_tiles(Ct, w, L, real=real)], dim=-1)  # (..., Hc, M, nodes)
        return torch.fft.irfft(T, n=L, dim=-1) if real else torch.fft.ifft(T, n=L, dim=-1)

    def kernel(self, L: int) -> torch.Tensor:
        """The convolution kernel ``K_l = 2 Re(C A_bar^l B_bar)``, ``(Hc, L)`` real, in float32 even under autocast."""
        with self._no_autocast():
            return self._kernel(L)

    def _no_autocast(self):
        """The SSM (kernel, carried states, step) runs in float32 even under bf16 autocast; only out_proj is cast."""
        return torch.autocast(self.log_dt.device.type, enabled=False)

    def _kernel(self, L: int) -> torch.Tensor:
        if self.mode == "s4d":
            dt, A, B, C, _ = self._params()
            dtA = dt[:, None] * A  # (Hc, N2)
            dB = B * torch.expm1(dtA) / A  # ZOH
            return 2 * self._vandermonde(C * dB, dtA, L, 0)
        dt, _, _, C, _ = self._params()
        _, dA, Bf, _ = self._dense()
        Cf = torch.cat([C, C.conj()], dim=-1)[:, None, :]  # (Hc, 1, N)
        Ct = Cf - Cf @ torch.linalg.matrix_power(dA, L)  # C (I - A_bar^L): the length-L truncation
        return self._cauchy(Ct, dt[:, None] * Bf, L, real=True)[:, 0]

    @staticmethod
    def _vandermonde(coef: torch.Tensor, dtA: torch.Tensor, L: int, offset: int) -> torch.Tensor:
        """``Re sum_n coef_n exp(dtA_n (l + offset))`` for l < L: coef ``(..., Hc, N2)`` -> ``(..., Hc, L)``.

        Blocked, with no ``(Hc, N2, L)`` tensor: position ``l = b T + j`` (T ~ sqrt(L)) splits the power into
        ``exp(dtA (offset + b T))``, folded into the coefficients of block b, times ``exp(dtA j)``, so each channel
        is one real matmul ``[Re W, -Im W] (rows * blocks, 2 N2) @ [Re V; Im V] (2 N2, T)``; channels go in
        tiles whose intermediates stay within ``TILE_BYTES``.
        """
        *batch, Hc, N2 = coef.shape
        Bt = math.prod(batch)
        T = _block_len(L)
        nb = -(-L // T)
        c = coef.reshape(Bt, Hc, N2).transpose(0, 1)  # (Hc, Bt, N2)
        outs = []
        for hs in _head_tiles(Hc, dtA.real.element_size() * max(Bt * nb * 2 * N2, 2 * N2 * T, Bt * nb * T)):
            E, V = _block_powers(dtA[hs], T, nb, offset)  # (h, nb, N2), (h, 2 N2, T)
            W = c[hs, :, None, :] * E[:, None]  # (h, Bt, nb, N2): coef_n exp(dtA_n (offset + b T))
            h = W.shape[0]
            W = torch.cat([W.real, -W.imag], dim=-1).reshape(h, Bt * nb, 2 * N2)
            outs.append((W @ V).reshape(h, Bt, nb * T)[..., :L])
        out = torch.cat(outs) if len(outs) > 1 else outs[0]  # (Hc, Bt, L)
        return out.transpose(0, 1).reshape(*batch, Hc, L)

    @staticmethod
    def _vandermonde_t(u: torch.Tensor, dtA: torch.Tensor) -> torch.Tensor:
        """``sum_l u_l exp(dtA_n l)``: real u ``(..., Hc, L)`` -> complex ``(..., Hc, N2)``, blocked as :meth:`_vandermonde`."""
        *batch, Hc, L = u.shape
        N2 = dtA.shape[-1]
        Bt = math.prod(batch)
        T = _block_len(L)
        nb = -(-L // T)
        U = F.pad(u.to(dtA.real.dtype).reshape(Bt, Hc, L), (0, nb * T - L)).transpose(0, 1)  # (Hc, Bt, nb T)
        outs = []
        for hs in _head_tiles(Hc, dtA.real.element_size() * max(Bt * nb * 2 * N2, 2 * N2 * T, Bt * nb * T)):
            E, V = _block_powers(dtA[hs], T, nb, 0)
            h = E.shape[0]
            S = (U[hs].reshape(h, Bt * nb, T) @ V.transpose(-1, -2)).reshape(h, Bt, nb, 2 * N2)
            P = torch.complex(S[..., :N2], S[..., N2:])  # sum_j u_(bT+j) exp(dtA j) per block
            outs.append((P * E[:, None]).sum(-2))  # (h, Bt, N2)
        out = torch.cat(outs) if len(outs) > 1 else outs[0]  # (Hc, Bt, N2)
        return out.transpose(0, 1).reshape(*batch, Hc, N2)

    @staticmethod
    def _power_sum(dA: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``sum_l dA^l v u_l``: dA ``(Hc, N, N)``, v ``(Hc, N)``, real u ``(..., Hc, L)`` -> ``(..., Hc, N)`` (DPLR).

        Blocked as :meth:`_vandermonde_t` with a dense transition: position ``l = b T + j`` (T the power of two at
        or above sqrt(L)); the in-block powers ``dA^j v`` (j < T, by doubling) times each block's inputs give one
        vector per block, which a tree of ``log2(blocks)`` steps combines with ``dA^T, dA^2T, ...``. Channels go
        in tiles whose intermediates stay within ``TILE_BYTES``; no ``(Hc, N, L)`` tensor.
        """
        *batch, Hc, L = u.shape
        N = v.shape[-1]
        Bt = math.prod(batch)
        if L == 0:
            return v.new_zeros(*batch, Hc, N)
        T = 1 << (_block_len(L) - 1).bit_length()  # power of two >= ceil(sqrt(L))
        nb = -(-L // T)
        U = F.pad(u.to(dA.real.dtype).reshape(Bt, Hc, L), (0, nb * T - L)).reshape(Bt, Hc, nb, T)
        U = U.permute(1, 3, 0, 2)  # (Hc, T, Bt, nb)
        outs = []
        for hs in _head_tiles(Hc, dA.element_size() * max(N * T, T * Bt * nb, N * Bt * nb, N * N)):
            Ak, P = dA[hs], v[hs, :, None]  # P[..., j] = dA^j v
            h = P.shape[0]
            while P.shape[-1] < T:
                P = torch.cat([P, Ak @ P], dim=-1)
                Ak = Ak @ Ak
            # now Ak = dA^T
            S = (P @ U[hs].reshape(h, T, Bt * nb).to(P.dtype)).reshape(h, N, Bt, nb)  # block sums
            while S.shape[-1] > 1:  # sum_b Ak^b S_b: pair (S_2i + Ak S_2i+1), then Ak^2
                if S.shape[-1] % 2:
                    S = torch.cat([S, S.new_zeros(h, N, Bt, 1)], dim=-1)
                odd = S[..., 1::2]
                S = S[..., 0::2] + (Ak @ odd.reshape(h, N, -1)).reshape(odd.shape)
                Ak = Ak @ Ak
            outs.append(S[..., 0])  # (h, N, Bt)
        out = torch.cat(outs) if len(outs) > 1 else outs[0]  # (Hc, N, Bt)
        return out.permute(2, 0, 1).reshape(*batch, Hc, N)

    # ----- carried-in state -------------------------------------------------------------------
    def _state_output(self, x0: torch.Tensor, L: int) -> torch.Tensor:
        """``2 Re(C A_bar^(l+1) x0)`` for l < L: x0 ``(B, H, N2)`` complex -> ``(B, H, L)``."""
        dt, A, _, C, _ = self._params()
        if self.mode == "s4d":
            return 2 * self._vandermonde(C * x0, dt[:, None] * A, L, 1)
        Amat, dA, _, _ = self._dense()
        x0f = torch.cat([x0, x0.conj()], dim=-1)  # (B, H, N)
        w = x0f + dt[:, None] / 2 * (Amat @ x0f[..., None])[..., 0]  # (I + dt/2 A) x0 = (I - dt/2 A) A_bar x0
        Cf = torch.cat([C, C.conj()], dim=-1)[:, None, :]
        Ct = Cf - Cf @ torch.linalg.matrix_power(dA, L)  # (H, 1, N)
        return self._cauchy(Ct.expand(x0.shape[0], *Ct.shape), w, L, real=True)[:, :, 0]

    def _final_state(self, x0: torch.Tensor | None, u: torch.Tensor, n_real: torch.Tensor) -> torch.Tensor:
        """State after u ``(B, H, L)`` (zeros at left pads) from x0 ``(B, H, N2)``; ``n_real (B,)`` real tokens."""
        dt, A, B, _, _ = self._params()
        # the input seen j steps ago is u[..., L-1-j]
        if self.mode == "s4d":
            dtA = dt[:, None] * A
            x = self._vandermonde_t(u.flip(-1), dtA) * (B * torch.expm1(dtA) / A)
            if x0 is not None:
                x = x + torch.exp(dtA * n_real[:, None, None].to(dt.dtype)) * x0
            return x
        N2 = A.shape[-1]
        _, dA, _, dB = self._dense()
        x = self._power_sum(dA, dB, u.flip(-1))[..., :N2]  # sum_l (A_bar^l B_bar)[top] u[L-1-l]
        if x0 is not None:
            x0f = torch.cat([x0, x0.conj()], dim=-1)
            for n in n_real.unique().tolist():  # A_bar^n x0 for each distinct count of real tokens
                rows_n = n_real == n
                x[rows_n] = x[rows_n] + (torch.linalg.matrix_power(dA, n)[:, :N2] @ x0f[rows_n][..., None])[..., 0]
        return x

    # ----- the layer ----------------------------------------------------------------------------
    def _output(self, y: torch.Tensor) -> torch.Tensor:
        y = self.out_proj(F.gelu(y))
        return F.glu(y, dim=-1) if self.glu else y

    def _convolve(
        self, u: torch.Tensor, k: torch.Tensor, state: State | None, n_pad: torch.Tensor | None, return_state: bool
    ) -> tuple[torch.Tensor, State | None]:
        """SSM convolution of u ``(B, L, H)`` with the first taps of k ``(Hc, >=L)``; returns pre-activation y."""
        with self._no_autocast():
            return self._convolve_fp32(u, k, state, n_pad, return_state)

    def _convolve_fp32(
        self, u: torch.Tensor, k: torch.Tensor, state: State | None, n_pad: torch.Tensor | None, return_state: bool
    ) -> tuple[torch.Tensor, State | None]:
        Bsz, L, H = u.shape
        ut = u.transpose(1, 2)  # (B, H, L)
        k = k[:, :L]
        if self.bidirectional:
            k0, k1 = k[:H], k[H:]
            k = F.pad(k0, (0, L)) + F.pad(k1.flip(-1), (L, 0))  # (H, 2L) two-sided kernel
        y = fft_conv(ut, k, self.D, backend=self.kernel_backend("fft_conv"))  # (B, H, L)
        n_pad = n_pad if n_pad is not None else torch.zeros(Bsz, dtype=torch.long, device=u.device)
        if state is not None:
            so = self._state_output(state["x"], L)  # (B, H, L), aligned to the first real token
            t = torch.arange(L, device=u.device)
            src = t[None, :] - n_pad[:, None]  # (B, L)
            so = so.gather(-1, src.clamp(min=0)[:, None, :].expand(Bsz, H, L)) * (src >= 0)[:, None, :]
            y = y + so.to(y.dtype)
        new = None
        if return_state:
            x0 = state["x"] if state is not None else None
            new = {"x": self._final_state(x0, ut, L - n_pad)}
        return y.transpose(1, 2), new  # (B, L, H)

    def scan(self, x: torch.Tensor, *, state: State | None = None, mask: torch.Tensor | None = None,
             cu_seqlens: torch.Tensor | None = None, return_state: bool = False) -> tuple[torch.Tensor, State | None]:
        """FFT-convolution path: ``x (B, L, D)`` -> ``y (B, L, D)`` and, if asked, the state after the last token.

        With ``cu_seqlens`` the carried-in and returned states hold one row per packed sequence.
        """
        if not self.causal and (state is not None or return_state):
            raise ValueError("s4: a bidirectional layer has no recurrent state; call it without a cache.")
        if cu_seqlens is not None:
            if mask is not None:
                raise ValueError("s4: pass either attention_mask (padding) or cu_seqlens (packing), not both.")
            return self._scan_packed(x, state, cu_seqlens, return_state)
        n_pad = None
        if mask is not None:
            n_pad = self._check_padding(mask, need_left=state is not None or return_state)
            x = x * mask[..., None].to(x.dtype)
        y, new = self._convolve(x, self.kernel(x.shape[1]), state, n_pad, return_state)
        return self._output(y), new

    def _scan_packed(
        self, x: torch.Tensor, state: State | None, cu_seqlens: torch.Tensor, return_state: bool
    ) -> tuple[torch.Tensor, State | None]:
        if x.shape[0] != 1:
            raise ValueError(f"s4: packed input (cu_seqlens) must have batch size 1; got {x.shape[0]}.")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != x.shape[1] or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"s4: cu_seqlens must rise from 0 to the packed length {x.shape[1]}; got {cu}.")
        k = self.kernel(max(1, *(b - a for a, b in zip(cu, cu[1:]))))  # one kernel; each sequence uses its first taps
        ys, states = [], []
        for i, (a, b) in enumerate(zip(cu, cu[1:])):
            st = {n: v[i : i + 1] for n, v in state.items()} if state is not None else None
            if a == b:  # an empty sequence: no output, the state passes through
                ys.append(x[:, a:b])
                if return_state:  # (a bidirectional layer has no state to pass through)
                    states.append(st if st is not None else self.init_state(1, device=x.device, dtype=x.dtype))
                continue
            y, new = self._convolve(x[:, a:b], k, st, None, return_state)
            ys.append(y)
            states.append(new)
        y = torch.cat(ys, dim=1)
        new = {"x": torch.cat([s["x"] for s in states])} if return_state else None
        return self._output(y), new

    def _check_padding(self, mask: torch.Tensor, *, need_left: bool) -> torch.Tensor | None:
        """Padding must be contiguous at the ends of each row; returns the left pads per row if ``need_left``."""
        m = mask.bool()
        L = m.shape[1]
        n_real = m.sum(1)
        first = torch.where(n_real > 0, m.int().argmax(1), torch.full_like(n_real, L))
        t = torch.arange(L, device=m.device)
        contiguous = torch.equal(m, (t >= first[:, None]) & (t < (first + n_real)[:, None]))
        left = torch.equal(first + n_real, torch.full_like(n_real, L))
        if not contiguous or (need_left and not left):
            raise ValueError(
                "s4: a convolution can only skip padding at the ends of a row; pad on the left (real tokens last), "
                "as generation does, or pack the sequences with cu_seqlens."
            )
        return L - n_real if need_left else None

    def forward(self, x, *, cache=None, attention_mask=None, cu_seqlens=None):
        """``(B, L, D) -> (B, L, D)``; causal layers go through the cache logic of :class:`RecurrentMixer`."""
        if (shard := sp.active()) is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("s4: a sequence-parallel slice takes no cache or padding mask; pack with cu_seqlens.")
            return self._output(self._sp_convolve(x, cu_seqlens, shard))
        if self.causal:
            return super().forward(x, cache=cache, attention_mask=attention_mask, cu_seqlens=cu_seqlens)
        if cache is not None:
            raise ValueError("s4: a bidirectional layer has no recurrent state to cache; call it without a cache.")
        mask = attention_mask[:, -x.shape[1] :] if attention_mask is not None else None
        return self.scan(x, mask=mask, cu_seqlens=cu_seqlens)[0]

    # ----- sequence parallelism ---------------------------------------------------------------
    def _sp_convolve(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None, shard: sp.SequenceShard) -> torch.Tensor:
        """Pre-activation y ``(B, L, H)`` of this rank's slice of a sequence split across ``shard``'s group.

        The slice's own convolution (per local document when packed) plus, per direction, the term of the state
        that enters the slice from the other ranks: ``2 Re(C A_bar^(l+1) x0)`` forward and
        ``2 Re(C A_bar^(n-1-l) x1)`` backward, with x0 / x1 composed by LASP-2 from every rank's modal state.
        """
        if self.mode == "dplr" and self.bidirectional:
            raise ValueError(
                "s4: a bidirectional layer runs sequence-parallel with the diagonal kernel only; set mode: s4d, or "
                "run the bidirectional dplr layer without train.parallel.sequence."
            )
        with self._no_autocast():
            Bsz, L, H = x.shape
            cu = cu_seqlens.tolist() if cu_seqlens is not None else None
            segs = [(0, L)] if cu is None else list(zip(cu, cu[1:]))  # unpacked: one segment of B rows; packed: documents
            k = self._kernel(max(1, *(b - a for a, b in segs)))
            with sp.local():
                y = torch.cat([self._convolve_fp32(x[:, a:b], k, None, None, False)[0] if b > a else x[:, a:b]
                               for a, b in segs], dim=1)  # (B, L, H): every slice on its own
            u = x.transpose(1, 2).to(torch.promote_types(x.dtype, torch.float32))  # (B, H, L)
            if self.mode == "dplr":
                return y + self._sp_dplr_term(u, segs, shard).to(y.dtype)
            for d in range(2 if self.bidirectional else 1):
                y = y + self._sp_state_term(u, segs, slice(d * H, (d + 1) * H), reverse=d == 1, shard=shard).to(y.dtype)
        return y

    def _sp_state_term(self, u: torch.Tensor, segs: list[tuple[int, int]], ch: slice, *, reverse: bool,
                       shard: sp.SequenceShard) -> torch.Tensor:
        """The other ranks' contribution ``(B, L, H)`` to one direction's output (channels ``ch`` of the SSMs)."""
        dt, A, Bp, C, _ = self._params()
        dtA = dt[ch, None] * A[ch]  # (H, N2)
        dB = Bp[ch] * torch.expm1(dtA) / A[ch]
        packed = len(segs) > 1 or u.shape[0] == 1
        rows = len(segs) if packed else u.shape[0]  # state rows: documents when packed, else the batch
        lengths = [b - a for a, b in segs] if packed else [segs[0][1]] * rows

        def seg_rows(t: torch.Tensor, i: int) -> torch.Tensor:  # the state rows of segment i
            return t[i : i + 1] if packed else t

        def run(init):
            finals, terms = [], []
            for i, (a, b) in enumerate(segs):
                ui, n = u[..., a:b], b - a
                final = self._vandermonde_t(ui if reverse else ui.flip(-1), dtA) * dB
                term = u.new_zeros(u.shape[0], u.shape[1], n)
                if init is not None:
                    x0 = seg_rows(init, i)
                    final = final + torch.exp(dtA * n) * x0
                    term = 2 * self._vandermonde(C[ch] * x0, dtA, n, 0 if reverse else 1)
                    term = term.flip(-1) if reverse else term
                finals.append(final)
                terms.append(term)
            return torch.cat(terms, dim=-1).transpose(1, 2), torch.cat(finals)  # (B, L, H), (rows, H, N2)

        def transition(carry_in):
            T = dB.new_zeros(rows, *dtA.shape)
            if carry_in is not None:
                n = torch.tensor(lengths, device=dtA.device)[carry_in]
                T = T.index_copy(0, carry_in.to(T.device), torch.exp(dtA * n[:, None, None].to(dtA.real.dtype)))
            return T

        carry_in, carry_out = sp.carry_rows(shard, rows, reverse=reverse)
        return sp.lasp(run, transition, carry_in=carry_in, carry_out=carry_out, shard=shard, reverse=reverse)[0]

    def _sp_dplr_term(self, u: torch.Tensor, segs: list[tuple[int, int]], shard: sp.SequenceShard) -> torch.Tensor:
        """:meth:`_sp_state_term` of a causal DPLR layer: its transition ``A_bar^n`` is a dense N x N matrix.

        The state goes through LASP-2 in its conjugate-completed form ``[x, conj(x)]`` ``(rows, H, N, 1)``, on
        which ``A_bar`` acts linearly (``matrix=True``); the kernel's own carried-state terms do the rest.
        """
        N2 = self.d_state // 2
        packed = len(segs) > 1 or u.shape[0] == 1
        rows = len(segs) if packed else u.shape[0]
        lengths = [b - a for a, b in segs] if packed else [segs[0][1]] * rows

        def run(init):
            finals, terms = [], []
            for i, (a, b) in enumerate(segs):
                ui, n = u[..., a:b], b - a
                x0 = None if init is None else (init[i : i + 1] if packed else init)[..., :N2, 0]  # (b, H, N2)
                n_real = torch.full((ui.shape[0],), n, device=u.device)
                final = self._final_state(x0, ui, n_real)
                finals.append(torch.cat([final, final.conj()], dim=-1)[..., None])  # (b, H, N, 1)
                terms.append(self._state_output(x0, n) if x0 is not None else u.new_zeros(*ui.shape))
            return torch.cat(terms, dim=-1).transpose(1, 2), torch.cat(finals)  # (B, L, H), (rows, H, N, 1)

        def transition(carry_in):
            _, dA, _, _ = self._dense()  # (H, N, N)
            T = dA.new_zeros(rows, *dA.shape)
            for r in carry_in.tolist() if carry_in is not None else []:
                T = T.index_copy(0, torch.tensor([r], device=T.device), torch.linalg.matrix_power(dA, lengths[r])[None])
            return T

        carry_in, carry_out = sp.carry_rows(shard, rows)
        return sp.lasp(run, transition, carry_in=carry_in, carry_out=carry_out, shard=shard, matrix=True)[0]

    # ----- recurrent view -----------------------------------------------------------------------
    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token ``x (B, D)`` -> ``y (B, D)``: ``x_t = A_bar x_{t-1} + B_bar u_t``, ``y = 2 Re(C x_t) + D u``."""
        if not self.causal:
            return super(RecurrentMixer, self).step(x, state)
        with self._no_autocast():
            y, xs = self._step_fp32(x, state["x"])
        return self._output(y.to(x.dtype)), {"x": xs}

    def _step_fp32(self, x: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dt, A, B, C, _ = self._params()
        u = x.to(dt.dtype)  # (B, H)
        if self.mode == "s4d":
            dtA = dt[:, None] * A
            xs = torch.exp(dtA) * xs + (B * torch.expm1(dtA) / A) * u[..., None]  # (B, H, N2)
        else:
            N2 = A.shape[-1]
            _, dA, _, dB = self._dense()
            xf = torch.cat([xs, xs.conj()], dim=-1)  # (B, H, N)
            xs = (dA[:, :N2] @ xf[..., None])[..., 0] + dB[:, :N2] * u[..., None]
        y = 2 * (C * xs).sum(-1).real + self.D.to(dt.dtype) * u  # (B, H)
        return y, xs

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        if not self.causal:
            return super(RecurrentMixer, self).init_state(batch_size, device=device, dtype=dtype)
        rt = torch.promote_types(dtype or torch.float32, torch.float32)
        return {"x": torch.zeros(batch_size, self.d_model, self.d_state // 2, dtype=_complex_of(rt), device=device)}

    def state_size(self, seq_len: int | None = None) -> int:
        """Floats of SSM state per sequence (N/2 complex modes per channel; a bidirectional layer has two)."""
        return self.d_model * self.d_state * (1 if self.causal else 2)
