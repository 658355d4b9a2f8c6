"""Rounding to a p-bit significand: round to nearest, ties to even (p = fraction bits)."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowar.analysis.rounding import is_representable, round_significand


def reference_round(value: float, p: int) -> float:
    """Independent definition: RNE on the integer bit pattern of a normal float64."""
    bits = struct.unpack("<q", struct.pack("<d", value))[0]
    negative = bits < 0
    bits &= (1 << 63) - 1
    drop = 52 - p
    if drop == 0:
        return value
    low, half = bits & ((1 << drop) - 1), 1 << (drop - 1)
    bits >>= drop
    if low > half or (low == half and bits & 1):
        bits += 1  # a carry into the exponent field is the correct renormalisation
    result = struct.unpack("<d", struct.pack("<q", bits << drop))[0]
    return -result if negative else result


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize(
    "value, p, expected",
    [
        (1.375, 2, 1.5),  # 1.01|1: tie, 1.01 is odd -> up to 1.10
        (1.125, 2, 1.0),  # 1.00|1: tie, 1.00 is even -> down
        (1.625, 2, 1.5),  # 1.10|1: tie, 1.10 is even -> down
        (1.875, 2, 2.0),  # 1.11|1: tie, 1.11 is odd -> up, carries into the exponent
        (1.3125, 2, 1.25),  # 1.01|01: below the tie -> down
        (1.4375, 2, 1.5),  # 1.01|11: above the tie -> up
        (-1.375, 2, -1.5),  # symmetric for negatives
        (2.5, 1, 2.0),  # 1.0|1 x 2: tie -> even 1.0 x 2
        (3.5, 1, 4.0),  # 1.1|1 x 2: tie -> odd goes up
        (0.1, 3, 0.1015625),  # 0.1 = 1.1001100.. x 2^-4 -> 1.101 x 2^-4
        (1 + 2**-30, 23, 1.0),  # float32-like rounding drops the tiny part
        (1 + 2**-23 + 2**-24, 23, 1 + 2**-22),  # tie at float32 precision, odd -> up
        (1.375 * 2.0**-1000, 2, 1.5 * 2.0**-1000),  # small normal exponent
        (1.375 * 2.0**1000, 2, 1.5 * 2.0**1000),  # large exponent
    ],
)
def test_hand_picked_values(value, p, expected):
    assert round_significand(f64(value), p).item() == expected


def test_special_values_are_kept():
    x = f64(0.0, -0.0, math.inf, -math.inf, math.nan)
    out = round_significand(x, 5)
    assert out[0].item() == 0.0 and math.copysign(1, out[0].item()) == 1
    assert out[1].item() == 0.0 and math.copysign(1, out[1].item()) == -1
    assert out[2].item() == math.inf and out[3].item() == -math.inf
    assert math.isnan(out[4].item())


def test_rounding_past_the_largest_float_overflows_like_ieee():
    # (2 - 2^-52) * 2^1023 at 51 fraction bits is a tie whose even neighbour is 2^1024.
    assert round_significand(f64(1.7976931348623157e308), 51).item() == math.inf
    assert round_significand(f64(1.7976931348623157e308), 52).item() == 1.7976931348623157e308


def test_p52_is_float64():
    x = torch.randn(1000, dtype=torch.float64) * 10.0 ** torch.randint(-200, 200, (1000,))
    assert torch.equal(round_significand(x, 52), x)


@settings(max_examples=100, deadline=None)
@given(
    st.floats(min_value=-1e300, max_value=1e300, allow_nan=False).filter(
        lambda v: v == 0 or abs(v) > 1e-300
    ),
    st.integers(min_value=1, max_value=52),
)
def test_matches_bit_level_definition(value, p):
    assert round_significand(f64(value), p).item() == reference_round(value, p)


@pytest.mark.parametrize("p", [1, 7, 10, 22, 23])
def test_float32_inputs_round_the_same_way(p):
    x = torch.randn(2000)
    expected = f64(*[reference_round(v, p) for v in x.double().tolist()])
    out = round_significand(x, p)
    assert out.dtype == torch.float32
    assert torch.equal(out.double(), expected)


@pytest.mark.parametrize("p", [3, 12, 30, 51])
def test_result_is_nearest_representable(p):
    x = torch.randn(5000, dtype=torch.float64)
    r = round_significand(x, p)
    assert is_representable(r, p)
    # Half an ulp of the result's binade bounds the error.
    _, exponent = torch.frexp(x)
    half_ulp = torch.ldexp(torch.ones_like(x), exponent - (p + 2))
    assert torch.all((r - x).abs() <= half_ulp)


def test_rejects_bad_p():
    with pytest.raises(ValueError):
        round_significand(f64(1.0), 0)
    with pytest.raises(ValueError):
        round_significand(f64(1.0), 53)


def test_integers_pass_through():
    x = torch.arange(10)
    assert round_significand(x, 3) is x
