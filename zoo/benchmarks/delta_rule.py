"""chunk_delta_rule: the chunked (WY/UT) torch path against the sequential recurrent loop, forward + backward.

    zoo bench delta_rule                              # CPU, L=4096, B=1, H=4, K=V=64, chunk 64, 1 thread
    zoo bench delta_rule --device cuda                # adds the Triton kernel (bf16 inputs)
    zoo bench delta_rule --record docs/benchmarks.md  # also append the table there
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.bench import bench_parser, fwd_bwd, record, setup, speedups
from zoo.kernels import chunk_delta_rule
from zoo.kernels.delta_rule.reference import delta_rule_reference


def inputs(B: int, L: int, H: int, K: int, device, dtype) -> list[torch.Tensor]:
    q = F.normalize(torch.randn(B, L, H, K, device=device), dim=-1)
    k = F.normalize(torch.randn(B, L, H, K, device=device), dim=-1)
    v = torch.randn(B, L, H, K, device=device)
    beta = torch.rand(B, L, H, device=device)
    g = F.logsigmoid(torch.randn(B, L, H, device=device) + 3)
    return [x.to(dtype).requires_grad_() for x in (q, k, v, beta, g)]


def main(argv: list[str] | None = None) -> None:
    args = bench_parser(__doc__, length=4096, batch=1, heads=4, head_dim=64, chunk=64).parse_args(argv)
    device, dtype = setup(args)
    torch.manual_seed(0)
    xs = inputs(args.batch, args.length, args.heads, args.head_dim, device, dtype)
    runs = {
        "recurrent loop (reference.py)": lambda: fwd_bwd(delta_rule_reference, xs),
        "chunked torch": lambda: fwd_bwd(chunk_delta_rule, xs, chunk_size=args.chunk, backend="torch"),
    }
    if device.type == "cuda":
        runs["triton"] = lambda: fwd_bwd(chunk_delta_rule, xs, chunk_size=args.chunk, backend="triton")
    rows = speedups(runs, baseline="recurrent loop (reference.py)", repeats=args.repeats, device=device)
    notes = (f"gated delta rule, B={args.batch}, L={args.length}, H={args.heads}, K=V={args.head_dim}, "
             f"chunk {args.chunk}, {dtype} inputs (compute float32); median of {args.repeats} after 1 warm-up; "
             "target >= 5x for the chunked path.")
    record("chunk_delta_rule: chunked vs recurrent, forward + backward",
           ["path", "fwd+bwd ms (median)", "speed-up vs recurrent"], rows, device=device, args=args, notes=notes)


if __name__ == "__main__":
    main()
