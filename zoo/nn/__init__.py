"""Shared layers: norms, gated norm, MLPs, short conv, rotary."""

from zoo.nn.conv import ShortConv, check, count_ids, seq_ids, seq_index, short_conv
from zoo.nn.mlp import GeluMLP, SwiGLU, swiglu_hidden
from zoo.nn.norm import GatedRMSNorm, RMSNorm, rms_norm
from zoo.nn.rotary import Rotary, apply_rotary, rotate_half

__all__ = [
    "GatedRMSNorm", "GeluMLP", "RMSNorm", "Rotary", "ShortConv", "SwiGLU",
    "apply_rotary", "check", "count_ids", "rms_norm", "rotate_half", "seq_ids", "seq_index", "short_conv",
    "swiglu_hidden",
]
