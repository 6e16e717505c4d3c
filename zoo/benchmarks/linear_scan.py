"""linear_scan forward + backward: the torch fast path against the sequential loop and a log-space scan,
then tokens/s of a 4-layer, D=512 minGRU and HGRN language-model training step.

    zoo bench linear_scan                               # CPU, float32, (B=8, L=4096, D=2048) and smaller shapes
    zoo bench linear_scan --device cuda                 # adds the Triton kernel (bf16 inputs)
    zoo bench linear_scan --record docs/benchmarks.md   # also append the tables there

The log-space scan is minGRU-pytorch's method (Heinsen 2023), written here from the maths:
``h = exp(a* + logcumsumexp(log b - a*))`` with ``a* = cumsum(log a)``; it needs ``a, b > 0``, so every
path is timed on ``a`` in [0.5, 1) and ``b`` in [0.1, 1.1). Times include ``.log()``/``.exp()`` for it.
"""

from __future__ import annotations

import torch

from zoo.bench import bench_parser, median_time, record, setup
from zoo.kernels import linear_scan
from zoo.kernels.scan.reference import linear_scan_ref


def log_space_scan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Heinsen's parallel scan in log space for positive a, b ``(B, L, D)`` (zero initial state)."""
    a_star = torch.cumsum(torch.log(a), dim=1)
    h = torch.exp(a_star + torch.logcumsumexp(torch.log(b) - a_star, dim=1))
    return h, h[:, -1]


def scan_inputs(B: int, L: int, D: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.rand(B, L, D, device=device) * 0.5 + 0.5
    b = torch.rand(B, L, D, device=device) + 0.1
    return a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()


def fwd_bwd(fn, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    h, _ = fn(a, b)
    h.float().sum().backward()
    a.grad = b.grad = None
    return h.detach()


def bench_scan(shapes, repeats: int, device, dtype) -> list[list]:
    paths = {
        "sequential loop (reference.py, autograd)": linear_scan_ref,
        "log-cumsumexp scan (Heinsen / minGRU-pytorch)": log_space_scan,
        "linear_scan torch (blocked two-pass)": lambda a, b: linear_scan(a, b, backend="torch"),
    }
    if device.type == "cuda":
        paths["linear_scan triton"] = lambda a, b: linear_scan(a, b, backend="triton")
    rows = []
    for B, L, D in shapes:
        torch.manual_seed(0)
        a, b = scan_inputs(B, L, D, device, dtype)
        ref = fwd_bwd(linear_scan_ref, a, b).float()
        times = {}
        for name, fn in paths.items():
            err = ((fwd_bwd(fn, a, b).float() - ref).abs().max() / ref.abs().max()).item()
            times[name] = (median_time(lambda fn=fn, a=a, b=b: fwd_bwd(fn, a, b), repeats=repeats, warmup=1, device=device), err)
            print(f"  ({B}, {L}, {D}) {name}: {times[name][0] * 1e3:.1f} ms", flush=True)
        base = times["sequential loop (reference.py, autograd)"][0]
        rows += [[f"({B}, {L}, {D})", name, t * 1e3, base / t, err] for name, (t, err) in times.items()]
    return rows


def bench_lm(mixers: list[str], *, batch: int, length: int, repeats: int) -> list[list]:
    """Tokens/s of one AdamW training step of a 4-layer, D=512 LM (SwiGLU MLPs), for each mixer and scan path."""
    import zoo.mixers.hgrn
    import zoo.mixers.mingru
    from zoo import build_model

    modules = {"mingru": zoo.mixers.mingru, "minlstm": zoo.mixers.mingru, "hgrn": zoo.mixers.hgrn}
    rows = []
    for mixer in mixers:
        for scan_name, scan in [("linear_scan torch", linear_scan), ("sequential loop", linear_scan_ref)]:
            torch.manual_seed(0)
            cfg = {"vocab_size": 8192, "d_model": 512, "n_layers": 4, "pattern": [mixer], "mlp": "swiglu"}
            model = build_model({"model": cfg})
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            ids = torch.randint(0, 8192, (batch, length))
            module = modules[mixer]
            saved = module.linear_scan
            module.linear_scan = lambda a, b, h0=None, *, cu_seqlens=None, scan=scan: scan(a, b, h0, cu_seqlens=cu_seqlens)

            def step(model=model, opt=opt, ids=ids):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            try:
                t = median_time(step, repeats=repeats, warmup=1)
            finally:
                module.linear_scan = saved
            rows.append([mixer, scan_name, f"({batch}, {length})", t * 1e3, batch * length / t])
            print(f"  LM {mixer} / {scan_name}: {batch * length / t:.0f} tokens/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser(__doc__, threads=None, batch=8, length=4096, width=2048, lm_batch=4, lm_length=256)
    ap.add_argument("--skip-lm", action="store_true", help="only the kernel table")
    args = ap.parse_args(argv)
    device, dtype = setup(args)
    shapes = [(args.batch, args.length, args.width), (8, 512, 512), (16, 256, 128)]
    rows = bench_scan(shapes, args.repeats, device, dtype)
    notes = (f"{str(dtype).removeprefix('torch.')}; a in [0.5, 1), b in [0.1, 1.1) (positive, for the log-space scan); "
             f"median of {args.repeats} after 1 warm-up; all shapes measured (none extrapolated).")
    record("linear_scan: torch fast path vs sequential loop vs log-cumsumexp scan, forward + backward",
           ["(B, L, D)", "path", "fwd+bwd ms (median)", "speed-up vs loop", "max rel. err vs loop"], rows,
           device=device, args=args, notes=notes)
    if not args.skip_lm and device.type == "cpu":
        lm_rows = bench_lm(["mingru", "hgrn"], batch=args.lm_batch, length=args.lm_length, repeats=args.repeats)
        notes = (f"forward + backward + AdamW step, float32, median of {args.repeats} after 1 warm-up; "
                 "`sequential loop` swaps reference.py in for linear_scan inside the mixers.")
        record("minGRU / HGRN LM training step on CPU (4 layers, D=512, SwiGLU MLP, vocab 8192)",
               ["mixer", "scan", "(batch, length)", "step ms (median)", "tokens/s"], lm_rows, args=args, notes=notes)

if __name__ == "__main__":
    main()
