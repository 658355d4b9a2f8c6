"""The released sampling recipe: time grids, time quantisation, guidance ramp and interval,
and the 2-D RoPE check of spec section 8 (values from the spec, not from the code)."""

import math

import pytest
import torch

from flowar.config import SamplingConfig
from flowar.flow.schedule import guidance_on, scale_guidance, time_grid
from flowar.nn.blocks import TimestepEmbedder
from flowar.nn.rope import Rope2d

# Spec 3.3: the README's "25 steps" is a 25-point grid, i.e. 24 Euler steps.
GRID_25 = [
    1.0, 0.93636, 0.87273, 0.80909, 0.74545, 0.68182, 0.61818, 0.55455, 0.49091, 0.42727,
    0.36364, 0.3, 0.25, 0.22917, 0.20833, 0.1875, 0.16667, 0.14583, 0.125, 0.10417, 0.08333,
    0.0625, 0.04167, 0.02083, 0.0,
]
# Spec 8: floor(1000 t) in fp32 for the 24 steps of that grid.
INTEGER_TIMES_24 = [
    1000, 936, 872, 809, 745, 681, 618, 554, 490, 427, 363, 300, 250, 229, 208, 187, 166, 145,
    125, 104, 83, 62, 41, 20,
]


def test_released_grid_25_steps():
    grid = time_grid(25, "released")
    assert grid.dtype == torch.float64
    assert len(grid) == 25
    assert grid.tolist() == pytest.approx(GRID_25, abs=5e-6)


def test_released_grid_50_steps_is_uniform():
    grid = time_grid(50, "released")
    assert len(grid) == 51
    assert grid.tolist() == pytest.approx([1 - i / 50 for i in range(51)], abs=1e-12)


def test_released_grid_other_counts():
    # 2 * (n // 2) steps: odd counts lose one step, the 0.3 -> 0.25 jump is always there
    for steps in (10, 11, 24):
        grid = time_grid(steps, "released").tolist()
        assert len(grid) == 2 * (steps // 2) + 1
        assert grid[steps // 2 - 1] == pytest.approx(0.3) and grid[steps // 2] == 0.25


def test_quantised_times_of_the_24_step_grid():
    t = torch.tensor(time_grid(25, "released").tolist()[:-1], dtype=torch.float32)
    embedder = TimestepEmbedder(width=8, feature_dim=256, time_scale=1000.0)
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    steps = torch.tensor(INTEGER_TIMES_24, dtype=torch.float64)[:, None] * freqs
    expected = torch.cat([torch.cos(steps), torch.sin(steps)], dim=-1)  # cos first
    assert torch.allclose(embedder.features(t).double(), expected, atol=1e-4)


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (4.3, [1.0, 1.825, 2.65, 3.475, 4.3]),
        (2.4, [1.0, 1.35, 1.7, 2.05, 2.4]),
        (2.8, [1.0, 1.45, 1.9, 2.35, 2.8]),
    ],
)
def test_per_scale_guidance_ramp(cfg, expected):
    assert scale_guidance(cfg, 5, "linear") == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "steps, high, on",
    [(25, 0.9, 22), (25, 0.7, 19), (50, 0.7, 35), (50, 0.9, 45)],
)
def test_guidance_interval_step_counts(steps, high, on):
    config = SamplingConfig(steps=steps, time_grid="released", cfg=4.3, guidance_high=high)
    grid = time_grid(steps, "released").tolist()[:-1]
    assert sum(guidance_on(4.3, t, config) for t in grid) == on
    assert not any(guidance_on(1.0, t, config) for t in grid)  # no guidance at scale 1x1


def test_rope_spec_check():
    rope = Rope2d(64)
    assert rope.freqs.numel() == 16
    for channel, moved in ((0, [2, 3]), (32, [1, 3])):  # channel 0: rows, channel 32: columns
        x = torch.zeros(4, 64)
        x[:, channel] = 1.0  # the 4 tokens of a 2x2 map, row-major
        out = rope(x, (2,), 16)
        for token in range(4):
            if token in moved:  # position 8 on the 16-wide grid: angle 8 * freqs[0] = 8
                assert out[token, channel].item() == pytest.approx(-0.1455, abs=1e-4)
                assert out[token, channel + 1].item() == pytest.approx(0.9894, abs=1e-4)
            else:
                assert torch.equal(out[token], x[token])
