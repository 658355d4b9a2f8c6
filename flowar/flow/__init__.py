"""Sampling maths outside the network: path, time grids, guidance, the scale-by-scale loop."""

from flowar.flow.path import euler_step, interpolate, target_velocity
from flowar.flow.sampler import generate, per_image_noise
from flowar.flow.schedule import guidance_on, scale_guidance, time_grid

__all__ = [
    "euler_step",
    "generate",
    "guidance_on",
    "interpolate",
    "per_image_noise",
    "scale_guidance",
    "target_velocity",
    "time_grid",
]
