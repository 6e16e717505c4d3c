"""Benchmark helpers shared by ``zoo.benchmarks`` (run as ``zoo bench NAME``) and ``scripts/bench_*.py``.

Timing (medians after warm-up), environment facts (device, versions, load average), the common command-line
options, and the record: every benchmark prints its table; it appends the table (with date, device, versions
and the exact command) to a file only when asked with ``--record FILE`` (e.g. ``--record docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

#: The checkout's results file (what ``--record docs/benchmarks.md`` writes in a source checkout).
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def bench_parser(doc: str | None, *, device: str = "cpu", threads: int | None = 1, repeats: int = 3,
                 **sizes: int | float | str | list) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares (--repeats, --device, --threads, --record) and one
    option per keyword in ``sizes``: ``head_dim=64`` is ``--head-dim`` (an int, default 64); a list default takes
    one or more values of its elements' type."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=repeats, help="timed repeats (the median is reported)")
    ap.add_argument("--device", default=device, help="cpu or cuda")
    if threads is not None:
        ap.add_argument("--threads", type=int, default=threads,
                        help="torch CPU threads (1 avoids oversubscribing a shared CPU)")
    ap.add_argument("--record", type=Path, default=None, metavar="FILE",
                    help="append the table with date, device, versions and command to FILE (default: print only)")
    for name, default in sizes.items():
        many = isinstance(default, list)
        kind = type(default[0] if many and default else default)
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=default, **({"nargs": "+"} if many else {}))
    return ap


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Apply --threads; the device, and the input dtype benchmarks use there (bf16 on CUDA, float32 on CPU)."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible here; run with --device cpu.")
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def fwd_bwd(fn: Callable, xs: list[torch.Tensor], **kw) -> None:
    """One forward + backward of a kernel ``fn(*xs, **kw) -> (out, state)``; clears the input gradients."""
    out, _ = fn(*xs, **kw)
    out.float().sum().backward()
    for x in xs:
        x.grad = None


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], *, repeats: int = 3, warmup: int = 1, device=None) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speedups(runs: dict[str, Callable[[], object]], *, baseline: str, repeats: int, device=None) -> list[list]:
    """``[name, median ms, speed-up vs baseline]`` for each of ``runs`` (timed after one warm-up run each)."""
    times = {name: median_time(fn, repeats=repeats, warmup=1, device=device) for name, fn in runs.items()}
    return [[name, t * 1e3, times[baseline] / t] for name, t in times.items()]


def device_description(device: torch.device | str = "cpu") -> str:
    """A human description of where the numbers come from."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    load = f", 1-min load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}{load}"


def versions() -> str:
    """Versions of the packages the numbers depend on."""
    import importlib.metadata as md

    parts = [f"python {platform.python_version()}"]
    for pkg in ("torch", "triton", "transformers", "flash-linear-attention", "mamba-ssm", "causal-conv1d", "seq-zoo"):
        try:
            parts.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            continue
    return ", ".join(parts)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The command that is running, as a user would type it again."""
    argv = [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]
    if argv[0].endswith(".py"):
        argv.insert(0, "python")
    elif Path(argv[0]).name == "zoo":
        argv[0] = "zoo"
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return env + " ".join(shlex.quote(a) for a in argv)


def record(title: str, header: list[str], rows: list[list], *, device=None, notes: str = "",
           path: Path | str | None = None, args: argparse.Namespace | None = None) -> str:
    """Print the table with date, device, versions and the exact command; append that block to ``path`` if given.

    ``args`` (a :func:`bench_parser` result) supplies what is not given: the device (``--device``) and the path
    (``--record``).
    """
    device = device if device is not None else getattr(args, "device", "cpu")
    path = path if path is not None else getattr(args, "record", None)
    table = markdown_table(header, rows)
    block = (
        f"\n## {title}\n\n"
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n"
        f"- device: {device_description(device)}\n"
        f"- versions: {versions()}\n"
        f"- command: `{command_line()}`\n"
        + (f"- notes: {notes}\n" if notes else "")
        + f"\n{table}\n"
    )
    print(block)
    if path is None:
        return block
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("# Benchmarks\n\nMeasured numbers only; each section says how it was measured.\n")
    with path.open("a") as f:
        f.write(block)
    print(f"appended to {path}")
    return block
