"""``torch.compile``d CPU inner loops, shared by the kernels' torch paths (``ZOO_CPU_COMPILE``).

Some torch paths are chains of elementwise passes over a chunk (the selective scan's unrolled steps, the causal
conv's shifted taps and SiLU). On CPU, inductor fuses such a chain into a few C++ loops whose intermediates stay in
registers: the same algorithm with fewer memory passes. They are compiled only where it pays: on CPU, in training
(gradients wanted: the same shapes come back every step, so the seconds of the first compile are amortised), at
sizes past each kernel's threshold, and never inside a user's own ``torch.compile`` (Dynamo traces the eager code
there itself). Inference (a prefill, ``generate``) stays eager by default: a one-off prompt would wait for the
compile.

``ZOO_CPU_COMPILE``: ``auto`` (the default: training at the size thresholds), ``always`` (any size, inference too:
the tests' setting, or a server that prefills many prompts), ``never`` (the eager loops only). A compile that fails
(no C++ compiler, an unsupported build) warns once and that kernel falls back to its eager loops for the rest of
the process.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

MODES = ("auto", "always", "never")
_compiled: dict[str, Callable] = {}
_failed: set[str] = set()


def compile_mode() -> str:
    """The ``ZOO_CPU_COMPILE`` setting; a value other than auto / always / never is an error naming them."""
    mode = os.environ.get("ZOO_CPU_COMPILE", "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"ZOO_CPU_COMPILE={mode!r}: use auto, always or never.")
    return mode


def use_compiled(op: str, x: torch.Tensor, size: int, threshold: int, training: bool | None = None) -> bool:
    """Whether kernel ``op`` runs its compiled loop for work of ``size`` elements on ``x``'s device.

    ``training``: whether a backward will follow (default: grad mode is on and ``x`` requires grad; a caller inside
    an ``autograd.Function``, where grad mode is off, decides it outside and passes it)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or op in _failed:
        return False
    mode = compile_mode()
    if training is None:
        training = torch.is_grad_enabled() and x.requires_grad
    return mode == "always" or (mode == "auto" and training and size >= threshold)


def run_compiled(op: str, name: str, fn: Callable, *args):
    """``torch.compile(fn)(*args)``, or None: for tensor subclasses (silently), or (after warning once) when compiling
    is impossible here.

    Compiled statically first; a second shape recompiles once with dynamic sizes (Dynamo's automatic dynamic).
    """
    if any(isinstance(a, torch.Tensor) and type(a) not in (torch.Tensor, torch.nn.Parameter) for a in args):
        return None  # a tensor subclass (DTensor under tensor parallelism, a fake or functional tensor): eager
    key = f"{op}.{name}"
    if key not in _compiled:
        _compiled[key] = torch.compile(fn)
    try:
        return _compiled[key](*args)
    except Exception as err:  # noqa: BLE001 -- inductor's failures (no compiler, unsupported build) vary widely
        _failed.add(op)
        warnings.warn(f"{op}: torch.compile of the CPU loop failed ({type(err).__name__}: {err}); using the eager "
                      "loops (set ZOO_CPU_COMPILE=never to skip the attempt).", stacklevel=3)
        return None
