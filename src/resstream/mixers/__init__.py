"""Sequence-axis local mixers, one file per method (loaded by the LOCAL_MIXERS registry)."""
from resstream.mixers.base import SLOTS, LocalMixer

__all__ = ["SLOTS", "LocalMixer"]
