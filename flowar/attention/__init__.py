"""Attention backends behind one interface (see :mod:`flowar.attention.base`)."""

from flowar.attention.base import AttentionBackend, AttentionState, BlockLayout, default_scale
from flowar.attention.registry import BACKENDS, build_backend
from flowar.attention.stats import CallStats, collect_stats

__all__ = [
    "AttentionBackend",
    "AttentionState",
    "BACKENDS",
    "BlockLayout",
    "CallStats",
    "build_backend",
    "collect_stats",
    "default_scale",
]
