"""Time grids and the guidance schedule (pure functions, no network)."""

from __future__ import annotations

import torch

from flowar.config import SamplingConfig


def time_grid(steps: int, kind: str = "uniform") -> torch.Tensor:
    """Euler time points from 1 (noise) to 0 (data), float64.

    Args:
        steps: requested number of steps.
        kind: "uniform" gives steps + 1 evenly spaced points. "released" reproduces the released
            sampler: 51 uniform points for steps == 50, otherwise steps // 2 points from 1.0 to
            0.3 followed by steps // 2 + 1 points from 0.25 to 0 (2 * (steps // 2) steps).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if kind == "uniform" or (kind == "released" and steps == 50):
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if kind == "released":
        half = steps // 2
        if half < 1:
            raise ValueError("the released grid needs steps >= 2")
        first = torch.linspace(1.0, 0.3, half, dtype=torch.float64)
        second = torch.linspace(0.25, 0.0, half + 1, dtype=torch.float64)
        return torch.cat([first, second])
    raise ValueError(f"unknown time grid {kind!r}; use 'uniform' or 'released'")


def scale_guidance(cfg: float, num_scales: int, schedule: str = "linear") -> list[float]:
    """Guidance strength per scale: linear ramp 1 -> cfg over the scales, or constant cfg."""
    if schedule == "constant" or num_scales == 1:
        return [float(cfg)] * num_scales
    if schedule == "linear":
        return [1.0 + (cfg - 1.0) * k / (num_scales - 1) for k in range(num_scales)]
    raise ValueError(f"unknown guidance schedule {schedule!r}; use 'linear' or 'constant'")


def guidance_on(strength: float, t: float, config: SamplingConfig) -> bool:
    """Whether a step at time t uses guidance: strength > 1 and t inside the interval."""
    return strength > 1.0 and config.guidance_low <= t <= config.guidance_high
