"""Fused sequence kernels. Each op is a folder with ``reference.py`` (pure torch, the oracle),
a fast torch path, ``triton.py`` (forward + backward) and a public function that dispatches on ``backend``.

Functions are imported lazily so that ``import zoo.kernels`` stays cheap and one broken backend
cannot break the others.
"""

from __future__ import annotations

import importlib

from zoo.kernels._dispatch import resolve_backend, triton_available

_EXPORTS = {
    "linear_scan": "zoo.kernels.linear_scan",
    "selective_scan": "zoo.kernels.selective_scan",
    "selective_state_update": "zoo.kernels.selective_scan",
    "causal_conv1d": "zoo.kernels.causal_conv1d",
    "causal_conv1d_update": "zoo.kernels.causal_conv1d",
    "chunk_gla": "zoo.kernels.gla",
    "chunk_delta_rule": "zoo.kernels.delta_rule",
    "ssd": "zoo.kernels.ssd",
    "fft_conv": "zoo.kernels.fft_conv",
}

__all__ = [*_EXPORTS, "resolve_backend", "triton_available"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'zoo.kernels' has no attribute {name!r}")
