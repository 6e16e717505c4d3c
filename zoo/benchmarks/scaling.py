"""Per-token cost of forward + backward as the sequence grows: every kernel's torch path, then every mixer.

    zoo bench scaling                                   # CPU, float32, L = 2048 and 16384, kernels and mixers
    zoo bench scaling --skip-mixers --repeats 5         # kernels only
    zoo bench scaling --lengths 1024 8192 --only linear_scan selective_scan
    zoo bench scaling --record docs/benchmarks.md       # also append the table there

Linear-time code should cost the same per token at every length. For each case the lengths are run
interleaved (repeat r of every length before repeat r + 1), and the medians of wall time and of this
process's user and system CPU time (``resource.getrusage``) are reported per token, with the ratio of the
longest to the shortest length. A case passes when its wall-time ratio is at most ``--limit`` (1.5).
Widths are fixed (batch 1, widths chosen so the longest length stays within a few hundred MB); the mixers run
at ``d_model = --d-model`` with their default options. Attention is quadratic by design and is skipped
unless named with ``--only``.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from zoo.bench import bench_parser, record, setup

Case = Callable[[int], tuple[Callable[..., torch.Tensor], list[torch.Tensor]]]


def _req(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.requires_grad_() for t in ts]


def _linear_scan(L: int):
    from zoo.kernels import linear_scan

    D = 512
    ins = _req(torch.rand(1, L, D) * 0.5 + 0.5, torch.randn(1, L, D))
    return lambda a, b: linear_scan(a, b, backend="torch")[0].sum(), ins


def _selective_scan(L: int):
    from zoo.kernels import selective_scan

    E, N = 256, 16
    ins = _req(torch.randn(1, E, L), torch.randn(1, E, L), -torch.rand(E, N) - 0.1, torch.randn(1, N, L),
               torch.randn(1, N, L), torch.randn(E), torch.randn(1, E, L))
    return (lambda u, dt, A, B, C, D, z: selective_scan(u, dt, A, B, C, D, z, delta_softplus=True,
                                                         backend="torch").sum()), ins


def _ssd(L: int):
    from zoo.kernels import ssd

    H, P, N = 8, 32, 32
    ins = _req(torch.randn(1, L, H, P), F.softplus(torch.randn(1, L, H)), -torch.rand(H) - 0.1,
               torch.randn(1, L, 1, N), torch.randn(1, L, 1, N))
    return lambda x, dt, A, B, C: ssd(x, dt, A, B, C, chunk_size=64, backend="torch").sum(), ins


def _gla(L: int):
    from zoo.kernels import chunk_gla

    H, K, V = 4, 32, 32
    ins = _req(torch.randn(1, L, H, K), torch.randn(1, L, H, K), torch.randn(1, L, H, V),
               F.logsigmoid(torch.randn(1, L, H, K) + 3))
    return lambda q, k, v, g: chunk_gla(q, k, v, g, backend="torch")[0].sum(), ins


def _delta_rule(L: int):
    from zoo.kernels import chunk_delta_rule

    H, K, V = 4, 32, 32
    ins = _req(F.normalize(torch.randn(1, L, H, K), dim=-1), F.normalize(torch.randn(1, L, H, K), dim=-1),
               torch.randn(1, L, H, V), torch.rand(1, L, H) * 0.9, F.logsigmoid(torch.randn(1, L, H) + 2))
    return lambda q, k, v, beta, g: chunk_delta_rule(q, k, v, beta, g, backend="torch")[0].sum(), ins


def _causal_conv1d(L: int):
    from zoo.kernels import causal_conv1d

    E, W = 512, 4
    ins = _req(torch.randn(1, E, L), torch.randn(E, W), torch.randn(E))
    return lambda x, w, b: causal_conv1d(x, w, b, "silu", backend="torch").sum(), ins


def _fft_conv(L: int):
    from zoo.kernels import fft_conv

    H = 256
    ins = _req(torch.randn(1, H, L), torch.randn(H, L) / L, torch.randn(H))
    return lambda u, k, D: fft_conv(u, k, D).sum(), ins


KERNELS: dict[str, Case] = {
    "scan/linear_scan": _linear_scan,
    "selective/selective_scan": _selective_scan,
    "ssd_scan/ssd": _ssd,
    "gla/chunk_gla": _gla,
    "delta_rule/chunk_delta_rule": _delta_rule,
    "conv/causal_conv1d": _causal_conv1d,
    "long_conv/fft_conv": _fft_conv,
}


def _mixer_case(name: str, d_model: int) -> Case:
    def make(L: int):
        from zoo.registry import build_mixer

        torch.manual_seed(0)
        mixer = build_mixer(name, d_model, backend="torch")
        x = torch.randn(1, L, d_model, requires_grad=True)
        params = [p for p in mixer.parameters() if p.requires_grad]

        def fn(x):
            return mixer(x).float().pow(2).mean()
        fn.params = params  # their grads are cleared after each run
        return fn, [x]
    return make


def _run(fn, ins: list[torch.Tensor]) -> tuple[float, float, float]:
    """One forward + backward; (wall, user, system) seconds."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn(*ins).backward()
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for t in [*ins, *getattr(fn, "params", [])]:
        t.grad = None
    return t1 - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime


def measure(make: Case, lengths: list[int], repeats: int) -> dict[int, tuple[float, float, float]]:
    """Median (wall, user, system) seconds per token at each length, repeats interleaved across lengths."""
    torch.manual_seed(0)
    cases = {L: make(L) for L in lengths}
    for L in lengths:  # warm-up
        _run(*cases[L])
    runs: dict[int, list] = {L: [] for L in lengths}
    for _ in range(repeats):
        for L in lengths:
            gc.collect()
            runs[L].append(_run(*cases[L]))
    return {L: tuple(statistics.median(r[i] for r in runs[L]) / L for i in range(3)) for L in lengths}


def rows_for(name: str, per_token: dict[int, tuple[float, float, float]], lengths: list[int], limit: float) -> list:
    lo, hi = per_token[lengths[0]], per_token[lengths[-1]]
    wall_ratio, user_ratio = hi[0] / lo[0], hi[1] / max(lo[1], 1e-12)
    row = [name]
    for L in lengths:
        row += [per_token[L][0] * 1e6, per_token[L][1] * 1e6, per_token[L][2] * 1e6]
    return row + [wall_ratio, user_ratio, "pass" if wall_ratio <= limit else "FAIL"]


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser(__doc__, repeats=3, lengths=[2048, 16384], d_model=128)
    ap.add_argument("--limit", type=float, default=1.5, help="largest wall-time ratio longest/shortest that passes")
    ap.add_argument("--skip-mixers", action="store_true", help="only the kernels")
    ap.add_argument("--skip-kernels", action="store_true", help="only the mixers")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME",
                    help="cases to run: kernel names (e.g. linear_scan) or mixer names (e.g. mamba, attention)")
    ap.add_argument("--note", default="", help="a sentence appended to the record's notes")
    args = ap.parse_args(argv)
    device, _ = setup(args)
    if device.type != "cpu":
        raise SystemExit("zoo bench scaling measures the torch paths on CPU; use --device cpu.")
    lengths = sorted(args.lengths)
    import zoo

    cases: dict[str, Case] = {}
    if not args.skip_kernels:
        cases.update({n: f for n, f in KERNELS.items() if args.only is None or n.split("/")[-1] in args.only or n in args.only})
    if not args.skip_mixers:
        for m in zoo.list_mixers():
            if (args.only is None and m != "attention") or (args.only is not None and m in args.only):
                cases[f"mixer {m}"] = _mixer_case(m, args.d_model)
    rows = []
    for name, make in cases.items():
        per_token = measure(make, lengths, args.repeats)
        rows.append(rows_for(name, per_token, lengths, args.limit))
        print("  " + " ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in rows[-1]), flush=True)
        gc.collect()
    header = ["case"]
    for L in lengths:
        header += [f"wall us/tok L={L}", f"user us/tok L={L}", f"sys us/tok L={L}"]
    header += [f"wall ratio {lengths[-1]}/{lengths[0]}", "user ratio", f"<= {args.limit}"]
    notes = (f"float32, torch paths, forward + backward; median of {args.repeats} interleaved repeats after 1 warm-up; "
             "user/sys are this process's CPU times (getrusage). Kernel widths: linear_scan D=512; selective_scan E=256 N=16 "
             "(with D, z); ssd H=8 P=32 N=32 chunk 64; chunk_gla / chunk_delta_rule H=4 K=V=32; causal_conv1d E=512 W=4; "
             f"fft_conv H=256; batch 1. Mixers: d_model={args.d_model}, default options, batch 1." + (f" {args.note}" if args.note else ""))
    record(f"Per-token cost from L={lengths[0]} to L={lengths[-1]} (forward + backward, torch paths)", header, rows,
           device=device, args=args, notes=notes)


if __name__ == "__main__":
    main()
