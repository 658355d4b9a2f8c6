"""Rounding to a p-bit significand, round to nearest with ties to even.

Convention used throughout :mod:`flowar.analysis`: ``p`` is the number of *fraction* bits, the
bits stored after the implicit leading 1, as in the IEEE formats (float64: p = 52, float32:
p = 23, bfloat16: p = 7). A p-bit float therefore has ``p + 1`` significant bits; in the notation
of the theory brief (significand m with 2^(P-1) <= |m| < 2^P) that is P = p + 1. With this
convention ``p = 52`` is exactly float64.

Only the significand is rounded. The exponent keeps float64's range, which stands in for the
theory's exponent range of 2^p values; results below float64's smallest normal number
(about 2.2e-308) are subnormal and get float64's own rounding on top (not modelled).
"""

from __future__ import annotations

import torch

# Fraction bits of the floating dtypes: rounding to p >= this is the identity.
FRACTION_BITS: dict[torch.dtype, int] = {
    torch.float64: 52,
    torch.float32: 23,
    torch.bfloat16: 7,
    torch.float16: 10,
}
MIN_P = 1
MAX_P = 52


def round_significand(x: torch.Tensor, p: int) -> torch.Tensor:
    """Round every entry of ``x`` to ``p`` fraction bits (p + 1 significant bits), ties to even.

    Zeros (with their sign), infinities and NaNs are returned unchanged. Non-floating tensors are
    returned as they are. The result has the dtype of ``x``; p at or above the dtype's own fraction
    bits is the identity.

    Args:
        x: any tensor.
        p: fraction bits, 1 <= p <= 52 (p = 0, a one-bit significand, has no "even"
            neighbour in a tie and is not supported).

    Returns:
        A new tensor (or ``x`` itself when nothing can change).
    """
    if not isinstance(p, int) or not MIN_P <= p <= MAX_P:
        raise ValueError(f"p must be an integer in [{MIN_P}, {MAX_P}], got {p!r}")
    if not x.is_floating_point() or p >= FRACTION_BITS.get(x.dtype, MAX_P):
        return x
    # x = mantissa * 2**exponent with 0.5 <= |mantissa| < 1; frexp gives (x, 0) for zeros
    # (sign kept), infinities and NaNs, which the steps below leave unchanged.
    mantissa, exponent = torch.frexp(x)
    # y = mantissa * 2**(p+1) is exact (power-of-two scaling) with |y| < 2**(p+1); rounding it
    # to an integer, ties to even, is the rounding we want.
    y = mantissa.mul_(float(2 ** (p + 1)))
    if p + 1 < FRACTION_BITS[x.dtype]:
        # Magic-number rounding: for |y| < 2**(f-1) (f = fraction bits of the dtype), y + c
        # with c = 1.5 * 2**f has unit spacing, so the hardware's round-to-nearest-even add
        # rounds y to an integer; subtracting c back is exact. Much faster than torch.round.
        magic = 1.5 * 2.0 ** FRACTION_BITS[x.dtype]
        y.add_(magic).sub_(magic)
    else:
        y = torch.round(y)  # torch.round rounds half to even
    out = torch.ldexp(y.mul_(2.0 ** -(p + 1)), exponent)  # exact unless subnormal
    return out.copysign_(x)  # the magic-number add turns -0.0 into +0.0


def is_representable(x: torch.Tensor, p: int) -> bool:
    """True when every finite entry of ``x`` already has at most ``p`` fraction bits."""
    return bool(torch.equal(round_significand(x, p), x))
