"""Small building blocks shared by the AR transformer and the flow head."""

from flowar.nn.blocks import GatedGeluMLP, TimestepEmbedder, modulate, rms_norm
from flowar.nn.rope import Rope2d, grid_positions

__all__ = ["GatedGeluMLP", "Rope2d", "TimestepEmbedder", "grid_positions", "modulate", "rms_norm"]
