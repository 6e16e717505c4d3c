"""Shared by every kernel folder: backend selection (:func:`resolve_backend`) and the accumulation dtype (:func:`compute_dtype`)."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("torch", "triton", "cuda")
#: What a model's ``backend`` setting may say (YAML ``model.backend`` or ``model.mixers.<name>.backend``).
BACKEND_SETTINGS = ("auto", *BACKENDS)
#: The backends each kernel offers; "cuda" is an optional package (the ``[cuda]`` extra).
KERNEL_BACKENDS = {
    "linear_scan": ("torch", "triton"),
    "selective_scan": ("torch", "triton", "cuda"),
    "causal_conv1d": ("torch", "triton", "cuda"),
    "chunk_gla": ("torch", "triton"),
    "chunk_delta_rule": ("torch", "triton"),
    "ssd": ("torch", "triton"),
    "fft_conv": ("torch",),
}
#: The optional package behind each "cuda" backend.
CUDA_PACKAGES = {"selective_scan": "mamba_ssm", "causal_conv1d": "causal_conv1d"}


def backend_for(setting: str | None, op: str) -> str | None:
    """A model's backend setting as the ``backend`` argument of kernel ``op`` (None = the kernel's auto choice).

    "torch" and "triton" are passed on where the kernel has them; "cuda" means the optional CUDA package where the
    kernel has one and Triton elsewhere; "auto" (or None) lets each kernel choose (Triton on CUDA tensors).
    """
    if setting in (None, "auto"):
        return None
    offered = KERNEL_BACKENDS.get(op, ("torch", "triton"))
    if setting in offered:
        return setting
    if setting == "cuda" and "triton" in offered:
        return "triton"
    return None  # e.g. fft_conv under "triton": its only path (torch.fft, cuFFT on GPU)


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


#: The largest intermediate buffer (bytes) a torch path builds beyond its inputs and outputs: fft_conv, ssd,
#: chunk_gla and chunk_delta_rule work in tiles (of channels or of chunks) under it. A fresh buffer past glibc's mmap
#: threshold (32 MiB at most) is mapped and unmapped on every call, page-faulting all of it again, which grows the
#: per-token cost with L (``zoo bench scaling``); under it, freed memory is reused. Each module keeps its own copy
#: (tests lower it to force many tiles).
TILE_BYTES = 8 << 20


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
