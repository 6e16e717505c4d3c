"""CPU benchmark: a zoo Mamba LM against transformers' MambaForCausalLM (its torch path), forward + backward.

Both models have the same config (4 layers, width 256, batch 2, d_state 16, no MLP) and the same weights
(copied from the zoo model by name). Prints a table of median seconds per forward+backward and appends it,
with device, versions, date and the exact command, to docs/benchmarks.md.

    python scripts/bench_mamba_cpu.py                     # L = 256 512 1024 4096; transformers at 256 512
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must not try to fetch hub kernels

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import MambaConfig, MambaForCausalLM  # noqa: E402

import zoo  # noqa: E402


def zoo_model(args) -> torch.nn.Module:
    cfg = {"model": {"vocab_size": args.vocab, "d_model": args.width, "n_layers": args.layers, "pattern": ["mamba"],
                     "mixers": {"mamba": {"d_state": 16, "d_conv": 4, "expand": 2}}, "mlp": "none"}}
    return zoo.build_model(cfg)


def hf_model(args, src: torch.nn.Module) -> torch.nn.Module:
    """transformers' Mamba with the zoo model's weights (names mapped one to one)."""
    cfg = MambaConfig(vocab_size=args.vocab, hidden_size=args.width, num_hidden_layers=args.layers, state_size=16,
                      conv_kernel=4, expand=2, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5,
                      tie_word_embeddings=True)
    hf = MambaForCausalLM(cfg)
    sd = {}
    for k, v in src.state_dict().items():
        k = k.replace("model.embed.", "backbone.embeddings.").replace("model.norm_f.", "backbone.norm_f.")
        k = k.replace("model.layers.", "backbone.layers.").replace(".mixer_norm.", ".norm.")
        sd[k] = v
    hf.load_state_dict(sd, strict=True)
    return hf


def fwd_bwd(model: torch.nn.Module, ids: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    return time.perf_counter() - t


def median_time(model, L: int, args, repeats: int) -> float:
    ids = torch.randint(0, args.vocab, (args.batch, L), generator=torch.Generator().manual_seed(L))
    return statistics.median(fwd_bwd(model, ids) for _ in range(repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 4096])
    p.add_argument("--hf-lengths", type=int, nargs="*", default=[256, 512])
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the zoo model (median)")
    p.add_argument("--hf-repeats", type=int, default=1, help="timed repeats of transformers' model (it is slow)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--out", default="docs/benchmarks.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = zoo_model(args).train()
    theirs = hf_model(args, ours).train()

    ids = torch.randint(0, args.vocab, (args.batch, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # same weights -> same logits; also warms both models up
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    logit_err = ((a - b).norm() / b.norm()).item()
    fwd_bwd(ours, ids)
    fwd_bwd(theirs, ids)

    rows = []
    for L in sorted(set(args.lengths) | set(args.hf_lengths)):
        t_zoo = median_time(ours, L, args, args.repeats) if L in args.lengths else None
        t_hf = median_time(theirs, L, args, args.hf_repeats) if L in args.hf_lengths else None
        rows.append((L, t_zoo, t_hf))
        print(f"L={L}: zoo {t_zoo} s, transformers {t_hf} s", flush=True)

    def fmt(x):
        return "-" if x is None else f"{x:.2f}"

    lines = ["| L | zoo Mamba fwd+bwd (s) | transformers Mamba fwd+bwd (s) | speed-up |", "|---|---|---|---|"]
    for L, tz, th in rows:
        lines.append(f"| {L} | {fmt(tz)} | {fmt(th)} | {'-' if tz is None or th is None else f'{th / tz:.1f}x'} |")
    table = "\n".join(lines)
    print(table)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = [
        f"## Mamba-1 LM forward+backward on CPU ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"- device: CPU ({cpu}), {os.cpu_count()} cores, torch threads {args.threads}, 1-min load average {load:.1f} at the end",
        f"- versions: torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
        f"- model: {args.layers} layers, width {args.width}, batch {args.batch}, d_state 16, d_conv 4, expand 2, "
        f"vocab {args.vocab}, no MLP, float32; transformers' MambaForCausalLM on its torch path with the same weights "
        f"(logits rel. err {logit_err:.1e})",
        f"- timing: median of {args.repeats} (zoo) / {args.hf_repeats} (transformers) forward+backward runs after warm-up",
        f"- command: `{env}{' '.join(['python', *sys.argv])}`",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write("\n" + "\n".join(header) + "\n" + table + "\n")
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
