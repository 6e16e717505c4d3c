"""Sequence mixers, one file per architecture; each registers itself with ``zoo.register_mixer``."""

from zoo.mixers.base import Mixer, RecurrentMixer

__all__ = ["Mixer", "RecurrentMixer"]
