"""The linear (rectified-flow) path between data (t = 0) and noise (t = 1)."""

from __future__ import annotations

import torch


def interpolate(data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) * data + t * noise, t broadcast from (B,) over the trailing dims."""
    t = t.reshape(-1, *([1] * (data.dim() - 1)))
    return (1 - t) * data + t * noise


def target_velocity(data: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """dx_t / dt = noise - data."""
    return noise - data


def euler_step(x: torch.Tensor, velocity: torch.Tensor, t_cur: float, t_next: float):
    """One explicit Euler step of dx/dt = v from t_cur to t_next (t_next < t_cur when sampling)."""
    return x + (t_next - t_cur) * velocity
