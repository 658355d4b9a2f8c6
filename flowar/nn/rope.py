"""2-D rotary position embedding on a normalised grid (the release's "fast vision RoPE").

Positions of an s x s map are i * grid / s, so every scale lives on the same grid-wide frame and
tokens of different scales covering the same top-left corner share a position. The first half of
the head channels rotates with the row, the second half with the column, in interleaved pairs
(2m, 2m + 1).
"""

from __future__ import annotations

import torch
from torch import nn


def grid_positions(
    sides: tuple[int, ...], grid: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column positions of the tokens of consecutive square maps, each (N,)."""
    rows, cols = [], []
    for side in sides:
        axis = torch.arange(side, device=device, dtype=torch.float32) * (grid / side)
        rows.append(axis.repeat_interleave(side))
        cols.append(axis.repeat(side))
    return torch.cat(rows), torch.cat(cols)


class Rope2d(nn.Module):
    """Rotates queries or keys of width ``head_dim`` by their 2-D grid positions.

    ``freqs`` (head_dim / 4 values) is a persistent buffer so that state dicts match the release.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {head_dim}")
        half = head_dim // 2
        freqs = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
        self.register_buffer("freqs", freqs)

    def angles(self, sides: tuple[int, ...], grid: int) -> torch.Tensor:
        """Rotation angle of every channel pair, (N, head_dim / 2)."""
        rows, cols = grid_positions(sides, grid, self.freqs.device)
        freqs = self.freqs.float()
        return torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)

    def forward(self, x: torch.Tensor, sides: tuple[int, ...], grid: int) -> torch.Tensor:
        """Rotate x (..., N, head_dim) whose N tokens are the maps ``sides`` in order."""
        angles = self.angles(sides, grid)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        pairs = x.unflatten(-1, (-1, 2))  # (..., N, head_dim / 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1)
        return rotated.flatten(-2)
