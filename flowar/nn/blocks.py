"""Normalisation, modulation, MLP and timestep embedding blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Weightless RMSNorm over the last dimension, computed in fp32, returned in x's dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


class GatedGeluMLP(nn.Module):
    """fc2(GELU(fc1_g(x)) * fc1_x(x)): the release's "SwiGLU" built with exact-erf GELU."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio * 2 / 3)
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.drop(F.gelu(self.fc1_g(x)) * self.fc1_x(x))
        return self.drop(self.fc2(hidden))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of floor(time_scale * t) (cos first), then a two-layer MLP."""

    def __init__(self, width: int, feature_dim: int = 256, time_scale: float = 1000.0) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.time_scale = time_scale
        self.mlp = nn.Sequential(nn.Linear(feature_dim, width), nn.SiLU(), nn.Linear(width, width))

    def features(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) times in [0, 1] to (B, feature_dim) sinusoidal features."""
        # NOTE: the release quantises time to integer steps; multiply in fp32, then truncate.
        steps = torch.floor(t.float() * self.time_scale)
        half = self.feature_dim // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = steps[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        weight_dtype = self.mlp[0].weight.dtype
        return self.mlp(self.features(t).to(weight_dtype))
