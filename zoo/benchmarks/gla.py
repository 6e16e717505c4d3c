"""chunk_gla: the chunked torch path against the sequential recurrent loop, forward + backward.

    zoo bench gla                                 # CPU (1 thread), L=4096, B=2, H=4, K=V=64, chunk 64, float32
    zoo bench gla --device cuda                   # adds the Triton kernel (bf16 inputs)
    zoo bench gla --record docs/benchmarks.md     # also append the table there

Both decay kinds are timed: a scalar log-decay per head (RetNet, SSD) and one per key dim (GLA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.bench import bench_parser, fwd_bwd, record, setup, speedups
from zoo.kernels import chunk_gla
from zoo.kernels.gla.reference import gla_recurrent


def inputs(B: int, L: int, H: int, K: int, *, per_key: bool, device, dtype) -> list[torch.Tensor]:
    """Random q, k, v and a log-decay in (-inf, 0) (per head or per key dim), requiring grad."""
    q, k, v = (torch.randn(B, L, H, K, device=device) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, L, H, *((K,) if per_key else ()), device=device) + 3)
    return [x.to(dtype).requires_grad_() for x in (q, k, v, g)]


def main(argv: list[str] | None = None) -> None:
    args = bench_parser(__doc__, length=4096, batch=2, heads=4, head_dim=64, chunk=64).parse_args(argv)
    device, dtype = setup(args)
    rows = []
    for per_key in (False, True):
        torch.manual_seed(0)
        xs = inputs(args.batch, args.length, args.heads, args.head_dim, per_key=per_key, device=device, dtype=dtype)
        runs = {
            "recurrent loop (reference.py)": lambda xs=xs: fwd_bwd(gla_recurrent, xs),
            "chunked torch": lambda xs=xs: fwd_bwd(chunk_gla, xs, chunk_size=args.chunk, backend="torch"),
        }
        if device.type == "cuda":
            runs["triton"] = lambda xs=xs: fwd_bwd(chunk_gla, xs, chunk_size=args.chunk, backend="triton")
        kind = "per key dim" if per_key else "scalar per head"
        rows += [[kind, *row] for row in speedups(runs, baseline="recurrent loop (reference.py)",
                                                   repeats=args.repeats, device=device)]
    notes = (f"B={args.batch}, L={args.length}, H={args.heads}, K=V={args.head_dim}, chunk {args.chunk}, "
             f"{str(dtype).removeprefix('torch.')}; median of {args.repeats} after 1 warm-up; shared machine.")
    record("chunk_gla: chunked vs recurrent, forward + backward",
           ["decay", "path", "fwd+bwd ms (median)", "speed-up vs recurrent"], rows, device=device, args=args, notes=notes)


if __name__ == "__main__":
    main()
