"""Benchmark helpers shared by the scripts in ``scripts/``: timing, environment facts, the results file."""

from __future__ import annotations

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

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


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


def record(title: str, header: list[str], rows: list[list], *, device="cpu", notes: str = "", path: Path = RESULTS) -> str:
    """Print the table and append it, with device, versions, date and the exact command, to docs/benchmarks.md."""
    table = markdown_table(header, rows)
    command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    block = (
        f"\n## {title}\n\n"
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n"
        f"- device: {device_description(device)}\n"
        f"- versions: {versions()}\n"
        f"- command: `python {command}`\n"
        + (f"- notes: {notes}\n" if notes else "")
        + f"\n{table}\n"
    )
    print(block)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("# Benchmarks\n\nMeasured numbers only; each section says how it was measured.\n")
    with path.open("a") as f:
        f.write(block)
    return block
