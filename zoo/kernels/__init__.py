"""Fused sequence kernels. Each op is a folder with ``reference.py`` (pure torch, the oracle),
a fast torch path, ``triton.py`` (forward + backward) and a public function that dispatches on ``backend``.

The public functions share their names with their folders, so they are bound here eagerly: once
``zoo.kernels.linear_scan`` the package has been imported, ``zoo.kernels.linear_scan`` is the function.
Triton itself is imported only when a Triton backend runs.
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


def _bind() -> None:
    for name, module in _EXPORTS.items():
        try:
            globals()[name] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            # Not built (yet) in this checkout: leave the name unbound so an import names what is missing.
            globals().pop(name, None)


_bind()
