"""Shared by every kernel folder: backend selection (:func:`resolve_backend`) and the accumulation dtype (:func:`compute_dtype`)."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("torch", "triton", "cuda")


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel accumulates in: float32 for half-precision inputs, float32 / float64 / complex as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str | None, *tensors: torch.Tensor, op: str, cuda_package: str | None = None) -> str:
    """Pick the backend for ``op``.

    ``None`` means auto: "triton" for CUDA tensors when Triton works, otherwise "torch".
    An explicitly requested backend that cannot run raises one clear error naming the fix.
    """
    dev = next((t.device for t in tensors if isinstance(t, torch.Tensor)), torch.device("cpu"))
    if backend is None:
        return "triton" if dev.type == "cuda" and triton_available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or None (auto).")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' was requested but Triton is not installed; `pip install triton` or use backend='torch'.")
        if dev.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"{op}: backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing triton to run on CPU; "
                "use backend='torch' on CPU."
            )
    if backend == "cuda":
        if cuda_package is None:
            raise RuntimeError(f"{op}: there is no 'cuda' backend for this op; use backend='triton' or 'torch'.")
        if importlib.util.find_spec(cuda_package) is None:
            raise RuntimeError(
                f"{op}: backend 'cuda' needs the optional package {cuda_package!r}; `pip install seq-zoo[cuda]` "
                "(builds mamba-ssm and causal-conv1d) or use backend='triton'."
            )
        if dev.type != "cuda":
            raise RuntimeError(f"{op}: backend 'cuda' needs CUDA tensors; move them with .cuda() or use backend='torch'.")
    return backend
