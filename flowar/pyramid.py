"""The scale pyramid: token layout of the scales, ground truth per scale, next-scale inputs.

Ground truth of a scale is the full map area-downsampled to that side. The AR input of scale
k+1 is scale k bicubic-upsampled to the full side and then area-downsampled to side k+1 (the
same two-step trick as VAR's tokenizer), so any strictly increasing list of sides works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flowar.attention.base import BlockLayout


@dataclass(frozen=True)
class ScaleLayout:
    """Where each scale's tokens sit in the concatenated sequence.

    Args:
        scales: strictly increasing sides; the last one is the full map.
    """

    scales: tuple[int, ...]

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(s * s for s in self.scales)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of every scale's tokens, followed by the total token count."""
        return self.block_layout().offsets

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def block_layout(self) -> BlockLayout:
        return BlockLayout(self.lengths)

    def segment(self, index: int) -> slice:
        """Token positions of scale ``index``."""
        offsets = self.offsets
        return slice(offsets[index], offsets[index + 1])


def area_down(x: torch.Tensor, side: int) -> torch.Tensor:
    """Area (adaptive average) downsampling of (B, C, H, W) to (B, C, side, side)."""
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="area")


def bicubic_up(x: torch.Tensor, side: int) -> torch.Tensor:
    """Bicubic (a = -0.75, half-pixel centres, no antialias) resize of (B, C, h, w) to side."""
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)


def scale_targets(full: torch.Tensor, scales: tuple[int, ...]) -> list[torch.Tensor]:
    """Ground truth of every scale: the full map (B, C, n, n) area-downsampled to each side."""
    return [area_down(full, side) for side in scales]


def next_scale_input(previous: torch.Tensor, next_side: int, full_side: int) -> torch.Tensor:
    """AR input for the next scale: bicubic up to the full side, then area down to next_side."""
    return area_down(bicubic_up(previous, full_side), next_side)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, s, s) map to (B, s*s, C) tokens, row-major."""
    return x.flatten(2).transpose(1, 2)


def from_tokens(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(B, s*s, C) tokens to a (B, C, s, s) map."""
    batch, count, channels = tokens.shape
    if count != side * side:
        raise ValueError(f"{count} tokens do not form a {side}x{side} map")
    return tokens.transpose(1, 2).reshape(batch, channels, side, side)
