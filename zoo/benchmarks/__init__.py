"""Benchmarks that ship with the package: ``zoo bench NAME [options]`` runs ``zoo.benchmarks.NAME.main``.

Each prints a table (medians after warm-up, with device, versions, date, load average and the command) and
appends it to a file only when asked: ``zoo bench gla --record docs/benchmarks.md``. Shared helpers live in
:mod:`zoo.bench`. The GPU comparison against FLA / mamba_ssm / causal-conv1d is ``scripts/bench_gpu.py``.
"""
