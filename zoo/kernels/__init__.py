"""Fused sequence kernels: one way to import each, ``from zoo.kernels import linear_scan``.

Each op is a folder named for what it computes, never for a public function (so a folder is never
shadowed by a name bound here): ``scan/`` (``linear_scan``), ``selective/`` (``selective_scan``,
``selective_state_update``), ``conv/`` (``causal_conv1d``, ``causal_conv1d_update``), ``gla/``
(``chunk_gla``), ``delta_rule/`` (``chunk_delta_rule``), ``ssd_scan/`` (``ssd``), ``long_conv/``
(``fft_conv``). Every folder has ``reference.py`` (the float64 oracle, imported by tests and benchmarks
only), ``chunked.py`` (the fast torch path, where there is one), ``triton.py`` (forward + backward) and
``__init__.py`` (the public function: its input checks and the dispatch on ``backend``). Backend
selection and ``compute_dtype`` live once in ``_dispatch.py``. Triton itself is imported only when a
Triton backend runs.
"""

from __future__ import annotations

from collections.abc import Callable

from zoo.kernels._dispatch import compute_dtype, resolve_backend, triton_available
from zoo.kernels.conv import causal_conv1d, causal_conv1d_update
from zoo.kernels.delta_rule import chunk_delta_rule
from zoo.kernels.gla import chunk_gla
from zoo.kernels.long_conv import fft_conv
from zoo.kernels.scan import linear_scan
from zoo.kernels.selective import selective_scan, selective_state_update
from zoo.kernels.ssd_scan import ssd

# The public kernels, name -> function (docs, the CLI and tests enumerate them from here).
KERNELS: dict[str, Callable] = {
    "linear_scan": linear_scan,
    "selective_scan": selective_scan,
    "selective_state_update": selective_state_update,
    "causal_conv1d": causal_conv1d,
    "causal_conv1d_update": causal_conv1d_update,
    "chunk_gla": chunk_gla,
    "chunk_delta_rule": chunk_delta_rule,
    "ssd": ssd,
    "fft_conv": fft_conv,
}

__all__ = [*KERNELS, "KERNELS", "compute_dtype", "resolve_backend", "triton_available"]
