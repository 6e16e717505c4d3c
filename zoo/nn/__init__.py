"""Shared layers: norms, gated norm, MLPs, short conv, rotary."""

from zoo.nn.conv import ShortConv
from zoo.nn.mlp import GeluMLP, SwiGLU, swiglu_hidden
from zoo.nn.norm import GatedRMSNorm, RMSNorm, rms_norm
from zoo.nn.rotary import Rotary, apply_rotary, rotate_half

__all__ = [
    "GatedRMSNorm", "GeluMLP", "RMSNorm", "Rotary", "ShortConv", "SwiGLU",
    "apply_rotary", "rms_norm", "rotate_half", "swiglu_hidden",
]
