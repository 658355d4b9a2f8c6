"""Scale pyramid: ground truth, next-scale inputs, token layout."""

import pytest
import torch

from flowar.pyramid import (
    ScaleLayout,
    area_down,
    from_tokens,
    next_scale_input,
    scale_targets,
    to_tokens,
)


@pytest.mark.parametrize("scales", [(1, 2, 4, 8), (1, 3, 5, 7), (2, 3, 6)])
def test_constant_map_passes_through_unchanged(scales):
    full = torch.full((2, 3, scales[-1], scales[-1]), 0.37)
    for target in scale_targets(full, scales):
        torch.testing.assert_close(target, torch.full_like(target, 0.37))
    for side, nxt in zip(scales, scales[1:]):
        prev = torch.full((2, 3, side, side), -1.25)
        out = next_scale_input(prev, nxt, scales[-1])
        assert out.shape == (2, 3, nxt, nxt)
        torch.testing.assert_close(out, torch.full_like(out, -1.25))


def test_area_down_is_block_mean():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    down = area_down(x, 2)
    expected = torch.tensor([[2.5, 4.5], [10.5, 12.5]])
    torch.testing.assert_close(down[0, 0], expected)


def test_non_power_of_two_layout():
    layout = ScaleLayout((1, 3, 5))
    assert layout.lengths == (1, 9, 25)
    assert layout.offsets == (0, 1, 10, 35)
    assert layout.segment(1) == slice(1, 10)
    allowed = layout.block_layout().allowed()
    assert allowed.sum(dim=1).tolist() == [1] + [10] * 9 + [35] * 25


def test_tokens_round_trip_row_major():
    x = torch.randn(2, 3, 4, 4)
    tokens = to_tokens(x)
    assert tokens.shape == (2, 16, 3)
    torch.testing.assert_close(tokens[:, 5], x[:, :, 1, 1])  # row 1, column 1 -> index 5
    torch.testing.assert_close(from_tokens(tokens, 4), x)
