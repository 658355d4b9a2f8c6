"""Certified bounds of the polynomial approximations of exp (flowar.attention.bounds)."""

import itertools
import math

import numpy as np
import pytest

from flowar.attention import bounds
from flowar.errors import UserError


def dense_relative_error(coeffs, beta, n=200_001):
    """Observed max |P(x) e^-x - 1| on a dense grid (a lower estimate of the true max)."""
    x = np.linspace(-beta, beta, n)
    return float(np.max(np.abs(np.polynomial.polynomial.polyval(x, coeffs) * np.exp(-x) - 1)))


@pytest.mark.parametrize("kind", bounds.KINDS)
@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 2.25, 4.0])
@pytest.mark.parametrize("degree", [1, 2, 3, 4, 6, 8])
def test_certified_eps_is_never_below_the_observed_error_and_close_to_it(kind, beta, degree):
    eps = bounds.relative_error(beta, degree, kind)
    coeffs = bounds.coefficients(beta, degree, kind)
    assert eps >= dense_relative_error(coeffs, beta)
    # Certified on the interval rounded up to the caching grid, and not loose there: within 5 %
    # (plus float noise) of what a dense grid sees.
    observed = dense_relative_error(coeffs, bounds.quantize_beta(beta))
    assert eps >= observed
    assert eps <= 1.05 * observed + 1e-13


@pytest.mark.parametrize(
    "beta, degree, kind, table_b",
    [  # theory brief, table B (60-digit arithmetic, independent of this code)
        (1, 4, "taylor", 0.019), (1, 8, "taylor", 6.8e-6), (2, 8, "taylor", 8.7e-3),
        (4, 2, "taylor", 2.7e2), (1, 4, "chebyshev", 1.2e-3), (2, 6, "chebyshev", 2.6e-3),
        (4, 8, "chebyshev", 0.15),
    ],
)
def test_eps_matches_the_theory_table(beta, degree, kind, table_b):
    assert bounds.relative_error(beta, degree, kind) == pytest.approx(table_b, rel=0.05)


@pytest.mark.parametrize("beta", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("degree", [2, 4, 7])
def test_taylor_eps_is_within_the_lagrange_remainder_bound(beta, degree):
    # eps_rel <= e^beta beta^(g+1) / (g+1)!  (theory brief 3.2, step 2)
    remainder = math.exp(beta) * beta ** (degree + 1) / math.factorial(degree + 1)
    assert bounds.relative_error(beta, degree, "taylor") <= remainder * (1 + 1e-12)


def test_quantized_beta_never_rounds_down():
    for beta in [1e-9, 0.0123456, 1.0, 2.0000001, 3.14159, 17.3, 123.456789]:
        q = bounds.quantize_beta(beta)
        assert q >= beta and q <= max(beta, bounds.MIN_BETA) * 2 ** (1 / 64) * (1 + 1e-12)
        assert bounds.quantize_beta(q) == q  # idempotent: cached values are reused


@pytest.mark.parametrize("d, g", [(1, 5), (3, 3), (4, 3), (6, 3), (5, 4)])
def test_rank_counts_monomials(d, g):
    brute = sum(1 for a in itertools.product(range(g + 1), repeat=d) if sum(a) <= g)
    assert bounds.rank(d, g) == brute


def test_output_bound():
    assert bounds.output_bound(0.1, 3.0) == pytest.approx(2 * 0.1 / 0.9 * 3.0)
    assert bounds.output_bound(0.9, 1.0) == 2.0  # convex-combination cap
    assert bounds.output_bound(5.0, 1.0, positive=True) == 2.0
    assert bounds.output_bound(0.1, 1.0, positive=False) == math.inf
    t = 1e-3
    e = bounds.eps_for_target(t)
    assert bounds.output_bound(e, 1.0) == pytest.approx(t)


@pytest.mark.parametrize("kind", bounds.KINDS)
@pytest.mark.parametrize("beta, target", [(0.25, 1e-2), (0.5, 1e-3), (1.0, 1e-3), (1.0, 1e-6)])
def test_choose_degree_is_the_smallest_meeting_the_target(kind, beta, target):
    g = bounds.choose_degree(beta, target, kind, max_degree=12)
    assert bounds.output_bound(bounds.relative_error(beta, g, kind), 1.0) <= target
    if g > 1:
        assert bounds.output_bound(bounds.relative_error(beta, g - 1, kind), 1.0) > target


def test_choose_degree_refuses_with_beta_and_target_in_the_message():
    with pytest.raises(UserError, match=r"beta = 9.*|0\.001") as info:
        bounds.choose_degree(9.0, 1e-3, "taylor", max_degree=8)
    assert "beta = 9" in str(info.value) and "0.001" in str(info.value)


@pytest.mark.parametrize("degree", [1, 3, 5, 7])
def test_odd_taylor_positivity_is_certified_exactly_up_to_its_root(degree):
    coeffs = bounds.coefficients(1.0, degree, "taylor")
    root = min(r.real for r in np.roots(coeffs[::-1]) if abs(r.imag) < 1e-9)  # negative root
    inside, outside = 0.95 * abs(root), 1.05 * abs(root)
    assert bounds.positive_on_interval(inside, degree, "taylor")
    assert not bounds.positive_on_interval(outside, degree, "taylor")
    assert np.polynomial.polynomial.polyval(-outside, coeffs) < 0  # the refusal is warranted


@pytest.mark.parametrize("degree", [2, 4, 6])
def test_even_taylor_is_always_positive(degree):
    x = np.linspace(-40, 40, 100_001)
    assert np.all(np.polynomial.polynomial.polyval(x, bounds.coefficients(1, degree, "taylor")) > 0)
    assert bounds.positive_on_interval(40.0, degree, "taylor")


def test_chebyshev_positivity_needs_eps_below_one():
    assert bounds.positive_on_interval(1.0, 2, "chebyshev")
    assert bounds.relative_error(9.0, 4, "chebyshev") > 1
    assert not bounds.positive_on_interval(9.0, 4, "chebyshev")


def test_huge_beta_is_not_certified():
    assert bounds.relative_error(1e4, 2, "taylor") == math.inf
    assert bounds.relative_error(1e4, 2, "chebyshev") == math.inf
    assert bounds.relative_error(float("nan"), 2, "taylor") == math.inf
