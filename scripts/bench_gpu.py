"""Every Triton kernel against its float64 reference (values and gradients) and timed against its peers.

    python scripts/bench_gpu.py                              # CUDA: fp32 + bf16, appends to docs/benchmarks.md
    python scripts/bench_gpu.py --no-record                  # CUDA, print only
    TRITON_INTERPRET=1 python scripts/bench_gpu.py --tiny --record /tmp/b.md   # CPU interpreter, tiny shapes (CI)

For each kernel and dtype: the relative error ``max |ours - ref| / max |ref|`` of the outputs (worst output)
and of the gradients of a fixed random projection of all outputs w.r.t. every input (worst input), where the
reference is the kernel's ``reference.py`` oracle in float64 on the same (rounded) inputs; then forward +
backward times (median after warm-up) of the Triton kernel, of our torch path and of the peer when it imports:
FLA (``chunk_gla``, ``chunk_simple_gla``, ``chunk_delta_rule``, ``chunk_gated_delta_rule``, ``chunk_hgrn``),
mamba_ssm (``selective_scan_fn``, ``mamba_chunk_scan_combined``) and causal-conv1d (``causal_conv1d_fn``).
A peer that is missing or fails is a "-" in the table. ``peer/triton`` is the peer's time over ours (> 1: ours
is faster). The table is appended to docs/benchmarks.md on CUDA runs, or to ``--record FILE``.
Exit status 1 when an error is above its tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

F64 = torch.float64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {"fp32": 5e-3, "bf16": 5e-2}  # max relative error, values and gradients (TF32 dots are allowed in fp32)
HEADER = ["kernel", "shape", "dtype", "err value", "err grad", "ok", "triton ms", "torch ms", "peer", "peer ms",
          "peer/triton"]


@dataclass
class Case:
    """One kernel call. ``make(dtype, device)`` returns the input leaves (``params`` keep float32 in low precision);
    ``ours(ins, backend)``, ``ref(ins)`` and ``peer(ins)`` return the list of outputs compared and timed."""

    kernel: str
    shape: str
    make: Callable[[torch.dtype, torch.device], dict[str, torch.Tensor]]
    ours: Callable[[dict, str], list[torch.Tensor]]
    ref: Callable[[dict], list[torch.Tensor]]
    peer_name: str = "-"
    peer: Callable[[dict], list[torch.Tensor]] | None = None


def _leaves(dtype, device, params=(), **xs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cast the float64 draws (params stay at least float32, like model weights) and make them leaves."""
    out = {}
    for name, x in xs.items():
        dt = torch.promote_types(dtype, torch.float32) if name in params else dtype
        out[name] = x.to(device=device, dtype=dt).requires_grad_()
    return out


# ----- cases --------------------------------------------------------------------------------------------
def linear_scan_case(B: int, L: int, D: int) -> Case:
    from zoo.kernels import linear_scan
    from zoo.kernels.scan.reference import linear_scan_ref

    def make(dtype, device):
        a = torch.rand(B, L, D, dtype=F64) * 0.5 + 0.49  # positive decays: FLA's hgrn takes log(a)
        return _leaves(dtype, device, a=a, b=torch.randn(B, L, D, dtype=F64), h0=torch.randn(B, D, dtype=F64))

    def peer(ins):
        from fla.ops.hgrn import chunk_hgrn

        o, last = chunk_hgrn(ins["b"], ins["a"].log(), initial_state=ins["h0"], output_final_state=True)
        return [o, last]

    return Case(
        "linear_scan", f"B={B} L={L} D={D}", make,
        lambda ins, backend: list(linear_scan(ins["a"], ins["b"], ins["h0"], backend=backend)),
        lambda ins: list(linear_scan_ref(ins["a"], ins["b"], ins["h0"])),
        "fla chunk_hgrn", peer,
    )


def selective_scan_case(B: int, E: int, N: int, L: int) -> Case:
    from zoo.kernels import selective_scan
    from zoo.kernels.selective.reference import selective_scan_ref

    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def make(dtype, device):
        return _leaves(
            dtype, device, params=("A", "D", "delta_bias"),
            u=torch.randn(B, E, L, dtype=F64), delta=torch.randn(B, E, L, dtype=F64) * 0.5,
            A=-torch.rand(E, N, dtype=F64) * 4 - 0.5, B=torch.randn(B, N, L, dtype=F64),
            C=torch.randn(B, N, L, dtype=F64), D=torch.randn(E, dtype=F64), z=torch.randn(B, E, L, dtype=F64),
            delta_bias=torch.randn(E, dtype=F64) * 0.5 - 1,
        )

    def call(fn, ins, **kw):
        return list(fn(*(ins[n] for n in names), delta_softplus=True, return_last_state=True, **kw))

    def peer(ins):
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return call(selective_scan_fn, ins)

    return Case(
        "selective_scan", f"B={B} E={E} N={N} L={L}", make,
        lambda ins, backend: call(selective_scan, ins, backend=backend),
        lambda ins: call(selective_scan_ref, ins),
        "mamba_ssm selective_scan_fn", peer,
    )


def causal_conv1d_case(B: int, E: int, L: int, W: int) -> Case:
    from zoo.kernels import causal_conv1d
    from zoo.kernels.conv.reference import causal_conv1d_ref

    def make(dtype, device):
        return _leaves(dtype, device, params=("weight", "bias"), x=torch.randn(B, E, L, dtype=F64),
                       weight=torch.randn(E, W, dtype=F64) / W, bias=torch.randn(E, dtype=F64))

    def peer(ins):
        from causal_conv1d import causal_conv1d_fn

        return [causal_conv1d_fn(ins["x"], ins["weight"], ins["bias"], activation="silu")]

    return Case(
        "causal_conv1d", f"B={B} E={E} L={L} W={W}", make,
        lambda ins, backend: [causal_conv1d(ins["x"], ins["weight"], ins["bias"], "silu", backend=backend)],
        lambda ins: [causal_conv1d_ref(ins["x"], ins["weight"], ins["bias"], "silu")],
        "causal-conv1d causal_conv1d_fn", peer,
    )


def gla_case(B: int, L: int, H: int, K: int, V: int, *, per_key: bool) -> Case:
    from zoo.kernels import chunk_gla
    from zoo.kernels.gla.reference import gla_recurrent

    def make(dtype, device):
        g = F.logsigmoid(torch.randn(B, L, H, *((K,) if per_key else ()), dtype=F64) + 3)
        return _leaves(dtype, device, q=torch.randn(B, L, H, K, dtype=F64), k=torch.randn(B, L, H, K, dtype=F64),
                       v=torch.randn(B, L, H, V, dtype=F64), g=g, h0=torch.randn(B, H, K, V, dtype=F64))

    def call(fn, ins, **kw):
        o, s = fn(ins["q"], ins["k"], ins["v"], ins["g"], initial_state=ins["h0"], output_final_state=True, **kw)
        return [o, s]

    def peer(ins):
        if per_key:
            from fla.ops.gla import chunk_gla as fla_gla
        else:
            from fla.ops.simple_gla import chunk_simple_gla as fla_gla
        return call(fla_gla, ins)

    return Case(
        f"chunk_gla (g per {'key' if per_key else 'head'})", f"B={B} L={L} H={H} K={K} V={V}", make,
        lambda ins, backend: call(chunk_gla, ins, backend=backend),
        lambda ins: call(gla_recurrent, ins),
        "fla " + ("chunk_gla" if per_key else "chunk_simple_gla"), peer,
    )


def delta_rule_case(B: int, L: int, H: int, K: int, V: int, *, gated: bool) -> Case:
    from zoo.kernels import chunk_delta_rule
    from zoo.kernels.delta_rule.reference import delta_rule_reference

    def make(dtype, device):
        xs = dict(q=F.normalize(torch.randn(B, L, H, K, dtype=F64), dim=-1),
                  k=F.normalize(torch.randn(B, L, H, K, dtype=F64), dim=-1),
                  v=torch.randn(B, L, H, V, dtype=F64), beta=torch.rand(B, L, H, dtype=F64).clamp(0.05, 0.95),
                  h0=torch.randn(B, H, K, V, dtype=F64))
        if gated:
            xs["g"] = F.logsigmoid(torch.randn(B, L, H, dtype=F64) + 3)
        return _leaves(dtype, device, **xs)

    def call(fn, ins, **kw):
        o, s = fn(ins["q"], ins["k"], ins["v"], ins["beta"], ins.get("g"), initial_state=ins["h0"],
                  output_final_state=True, **kw)
        return [o, s]

    def peer(ins):
        kw = dict(initial_state=ins["h0"], output_final_state=True)
        if gated:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            o, s = chunk_gated_delta_rule(ins["q"], ins["k"], ins["v"], g=ins["g"], beta=ins["beta"], **kw)
        else:
            from fla.ops.delta_rule import chunk_delta_rule as fla_delta_rule

            o, s = fla_delta_rule(ins["q"], ins["k"], ins["v"], beta=ins["beta"], **kw)
        return [o, s]

    return Case(
        "chunk_delta_rule" + (" (gated)" if gated else ""), f"B={B} L={L} H={H} K={K} V={V}", make,
        lambda ins, backend: call(chunk_delta_rule, ins, backend=backend),
        lambda ins: call(delta_rule_reference, ins),
        "fla " + ("chunk_gated_delta_rule" if gated else "chunk_delta_rule"), peer,
    )


def ssd_case(b: int, L: int, h: int, p: int, g: int, n: int, chunk: int) -> Case:
    from zoo.kernels import ssd
    from zoo.kernels.ssd_scan.reference import ssd_ref

    def make(dtype, device):
        return _leaves(dtype, device, params=("A", "D"), x=torch.randn(b, L, h, p, dtype=F64),
                       dt=F.softplus(torch.randn(b, L, h, dtype=F64) - 1), A=-(torch.rand(h, dtype=F64) * 4 + 0.5),
                       B=torch.randn(b, L, g, n, dtype=F64), C=torch.randn(b, L, g, n, dtype=F64),
                       D=torch.randn(h, dtype=F64), h0=torch.randn(b, h, p, n, dtype=F64))

    def ours(ins, backend):
        return list(ssd(*(ins[k] for k in ("x", "dt", "A", "B", "C", "D")), chunk_size=chunk, initial_state=ins["h0"],
                        return_final_state=True, backend=backend))

    def peer(ins):
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        y, s = mamba_chunk_scan_combined(ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], chunk, D=ins["D"],
                                         initial_states=ins["h0"], return_final_states=True)
        return [y, s]

    return Case(
        "ssd", f"b={b} L={L} h={h} p={p} g={g} n={n}", make, ours,
        lambda ins: list(ssd_ref(*(ins[k] for k in ("x", "dt", "A", "B", "C", "D")), initial_state=ins["h0"])),
        "mamba_ssm mamba_chunk_scan_combined", peer,
    )


def cases(tiny: bool) -> list[Case]:
    """The benchmark shapes; ``tiny`` ones (odd head sizes, partial chunks) keep the CPU interpreter quick."""
    if tiny:
        return [
            linear_scan_case(2, 13, 24), selective_scan_case(1, 4, 5, 9), causal_conv1d_case(1, 6, 20, 4),
            gla_case(1, 20, 1, 24, 8, per_key=False), gla_case(1, 12, 1, 24, 8, per_key=True),
            delta_rule_case(1, 20, 1, 24, 8, gated=False), delta_rule_case(1, 20, 1, 24, 8, gated=True),
            ssd_case(1, 20, 2, 8, 1, 24, 16),
        ]
    return [
        linear_scan_case(8, 4096, 2048), selective_scan_case(4, 1536, 16, 2048), causal_conv1d_case(4, 1536, 4096, 4),
        gla_case(4, 2048, 8, 64, 64, per_key=False), gla_case(4, 2048, 8, 64, 64, per_key=True),
        delta_rule_case(4, 2048, 8, 64, 64, gated=False), delta_rule_case(4, 2048, 8, 64, 64, gated=True),
        ssd_case(4, 2048, 8, 64, 1, 64, 64),
    ]


KERNELS = ["linear_scan", "selective_scan", "causal_conv1d", "chunk_gla (g per head)", "chunk_gla (g per key)",
           "chunk_delta_rule", "chunk_delta_rule (gated)", "ssd"]  # the rows of every run (names of cases())


# ----- measuring -----------------------------------------------------------------------------------------
def _projections(outs: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=F64).to(o.device) for o in outs]


def _fwd_bwd(fn: Callable[[dict], list[torch.Tensor]], ins: dict, weights: list[torch.Tensor] | None = None):
    """Outputs and the gradients of ``sum <out_i, w_i>`` w.r.t. every input (w fixed random when None)."""
    outs = fn(ins)
    weights = _projections(outs) if weights is None else weights
    loss = sum((o.to(F64) * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, list(ins.values()))
    return outs, grads, weights


def rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """Worst ``max |got - want| / max |want|`` over a list of tensors."""
    errs = [((a.to(F64) - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(got, want)]
    return max(errs) if errs else 0.0


def _time(fn: Callable[[dict], list[torch.Tensor]], ins: dict, args, device) -> float:
    """Median forward + backward time in ms."""
    from zoo.bench import median_time

    def step():
        outs = fn(ins)
        torch.autograd.backward([o for o in outs if o.requires_grad], [torch.ones_like(o) for o in outs if o.requires_grad])
        for x in ins.values():
            x.grad = None

    return median_time(step, repeats=args.repeats, warmup=args.warmup, device=device) * 1e3


def measure(case: Case, dname: str, args, device: torch.device) -> list:
    """One table row: errors against the float64 reference and the times of triton, torch and the peer."""
    torch.manual_seed(0)
    ins = case.make(DTYPES[dname], device)
    ref_ins = {k: v.detach().to(F64).requires_grad_() for k, v in ins.items()}  # the same rounded values
    ref_out, ref_grads, weights = _fwd_bwd(case.ref, ref_ins)
    out, grads, _ = _fwd_bwd(lambda x: case.ours(x, "triton"), ins, weights)
    err_v, err_g = rel_err(out, ref_out), rel_err(list(grads), list(ref_grads))
    ok = err_v < TOL[dname] and err_g < TOL[dname]
    t_triton = _time(lambda x: case.ours(x, "triton"), ins, args, device)
    t_torch = _time(lambda x: case.ours(x, "torch"), ins, args, device)
    t_peer: float | str = "-"
    if case.peer is not None and device.type == "cuda" and not args.no_peers:
        try:
            t_peer = _time(case.peer, ins, args, device)
        except Exception as e:  # a missing or incompatible peer is a "-", not an error
            print(f"{case.kernel}: peer {case.peer_name} unavailable ({type(e).__name__}: {e})", file=sys.stderr)
    ratio = t_peer / t_triton if isinstance(t_peer, float) else "-"
    return [case.kernel, case.shape, dname, err_v, err_g, "yes" if ok else "NO", t_triton, t_torch,
            case.peer_name if isinstance(t_peer, float) else "-", t_peer, ratio]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes; on CPU this runs Triton's interpreter")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, from: " + ", ".join(DTYPES))
    ap.add_argument("--only", default="", help="comma-separated substrings of kernel names to run")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 10; 1 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="extra warm-up runs (default 2; 0 with --tiny)")
    ap.add_argument("--record", type=Path, default=None, help="append the table to this file")
    ap.add_argument("--no-record", action="store_true", help="print only (a CUDA run appends to docs/benchmarks.md)")
    ap.add_argument("--no-peers", action="store_true", help="skip FLA / mamba_ssm / causal-conv1d")
    args = ap.parse_args(argv)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 2)
    dnames = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dnames if d not in DTYPES]
    if bad or not dnames:
        ap.error(f"--dtypes: unknown {bad or dnames}; choose from {', '.join(DTYPES)}.")
    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
    if not cuda:
        if not args.tiny:
            ap.error("no CUDA device (or TRITON_INTERPRET=1): run `TRITON_INTERPRET=1 python scripts/bench_gpu.py --tiny`.")
        if "triton" not in sys.modules:
            os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            ap.error("on CPU the Triton kernels need TRITON_INTERPRET=1 set before triton is imported.")
    device = torch.device("cuda" if cuda else "cpu")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    todo = [c for c in cases(args.tiny) if not only or any(s in c.kernel for s in only)]
    if not todo:
        ap.error(f"--only {args.only!r} matches no kernel; kernels: {', '.join(KERNELS)}.")

    from zoo.bench import RESULTS, markdown_table, record

    rows = []
    for case in todo:
        for dname in dnames:
            try:
                rows.append(measure(case, dname, args, device))
            except Exception as e:
                traceback.print_exc()
                rows.append([case.kernel, case.shape, dname, "-", "-", f"NO ({type(e).__name__})", "-", "-", "-", "-", "-"])
            print(" | ".join(str(v) for v in rows[-1]), file=sys.stderr, flush=True)
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"
    notes = (
        f"{'tiny shapes, Triton interpreter on CPU (timings are interpreter times, not kernel speed)' if not cuda else 'CUDA ' + str(torch.version.cuda)}; "
        f"1-min load average {load}; forward + backward, median of {args.repeats} after {args.warmup} warm-up "
        f"run(s) plus the error run; err = max|ours - ref| / max|ref| (worst output; worst input gradient) against "
        f"reference.py in float64 on the same rounded inputs; tolerance {', '.join(f'{d} {TOL[d]:g}' for d in dnames)}; "
        "peer/triton > 1 means the Triton kernel is faster; '-' = peer not installed or failed."
    )
    title = "Triton kernels vs reference and peers, forward + backward" + (" (tiny, interpreter)" if not cuda else "")
    if args.record is not None or (cuda and not args.no_record):
        record(title, HEADER, rows, device=device, notes=notes, path=args.record or RESULTS)
    else:
        print(f"\n## {title}\n\n- notes: {notes}\n\n{markdown_table(HEADER, rows)}\n")
    return 0 if all(r[5] == "yes" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
